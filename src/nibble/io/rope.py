"""The RoPE keys of a Hugging Face config.json, written so that transformers 4.x and 5.x read the same thing."""

from __future__ import annotations

from typing import Any


def rope_config_keys(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` (``{"rope_type": ..., "factor": ..., ...}``, None for plain RoPE),
    which transformers 4.x reads (it ignores ``rope_parameters`` and would fall back to theta 10000), and
    ``rope_parameters`` (theta and scaling in one object), which 5.x reads; 5.x takes ``rope_scaling`` over
    ``rope_parameters`` when both are set, so the three are always written together and agree."""
    scaling = dict(scaling) if scaling else None
    parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": parameters}

"""nibble: fine-tune decoder language models on one small machine (4-bit frozen weights + LoRA)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # load_model pulls in torch and the model code; importing it lazily keeps `import nibble` (and the CLI) light.
    if name == "load_model":
        from nibble.model.loading import load_model

        return load_model
    raise AttributeError(f"module 'nibble' has no attribute {name!r}")

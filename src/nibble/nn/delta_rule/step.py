"""One token of the gated delta rule: the form generation runs at each new token (see the package docstring)."""

from __future__ import annotations

import torch


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the state and its arithmetic use for inputs like ``x``: fp64 for fp64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: ``q``, ``k`` [B, Hk, Dk], ``v`` [B, Hv, Dv], ``g``, ``beta`` [B, Hv], ``state`` [B, Hv, Dk, Dv]
    -> (output [B, Hv, Dv] in ``v``'s dtype, the new state). The state passed in is not modified."""
    dtype = state_dtype(v)
    group = v.shape[1] // k.shape[1]
    q, k = (t.to(dtype).repeat_interleave(group, dim=1) for t in (q, k))  # [B, Hv, Dk]
    decayed = state.to(dtype) * g.to(dtype).exp()[..., None, None]  # [B, Hv, Dk, Dv]
    predicted = torch.einsum("bhk,bhkv->bhv", k, decayed)
    delta = (v.to(dtype) - predicted) * beta.to(dtype)[..., None]  # [B, Hv, Dv]
    new_state = decayed + k[..., :, None] * delta[..., None, :]
    out = torch.einsum("bhk,bhkv->bhv", q * scale, new_state)
    return out.to(v.dtype), new_state

"""The plain recurrence, token after token, differentiable by autograd: the oracle the other forms are tested
against (see the package docstring)."""

from __future__ import annotations

import torch

from nibble.nn.delta_rule.step import gated_delta_step, state_dtype


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [B, T, Hv, Dv] and final states ([B or S, Hv, Dk, Dv]) of the recurrence, one token at a time.
    Same arguments as :func:`~nibble.nn.delta_rule.chunk_gated_delta_rule`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, t, hv, dv = v.shape
    if cu_seqlens is None:
        spans = [(row, 0, t) for row in range(b)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(b)]  # each row's outputs, [L, Hv, Dv] per sequence
    finals = []
    for s, (row, start, end) in enumerate(spans):
        if initial_state is not None:
            state = initial_state[s]
        else:
            state = v.new_zeros(hv, q.shape[-1], dv, dtype=state_dtype(v))
        state = state[None]  # [1, Hv, Dk, Dv]
        steps = []
        for i in range(start, end):
            o, state = gated_delta_step(
                q[row : row + 1, i], k[row : row + 1, i], v[row : row + 1, i], g[row : row + 1, i],
                beta[row : row + 1, i], state, scale,
            )  # fmt: skip
            steps.append(o[0])
        if steps:
            pieces[row].append(torch.stack(steps))
        finals.append(state[0])
    return torch.stack([torch.cat(row) for row in pieces]), torch.stack(finals)

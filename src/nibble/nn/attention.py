"""Causal grouped-query attention in blocks of queries, for training on CPU at long sequences.

``blocked_causal_attention(q, k, v)`` equals ``F.scaled_dot_product_attention(q, k, v, is_causal=True,
enable_gqa=True)``. The query heads that share a key/value head are stacked into the rows of one matrix, so
each block of queries is a few large batched matmuls against the keys up to the block's end: a causal
block never multiplies the keys after it, and the grouped heads never copy keys or values. Only the
queries, keys, values and the output are kept for backward; each block's probabilities are recomputed
there (``softmax`` and its backward are single fused passes over a block that fits in cache).

On a CPU, training with grouped heads at 256-767 tokens, this is faster than SDPA's fused kernel, which
works in small query blocks at those lengths (``benchmarks/bench_attention.py``);
:func:`nibble.model.model.attend` decides when to use it.
"""

from __future__ import annotations

import math

import torch

# Query rows (tokens x grouped heads) per block: large enough for efficient batched matmuls, small
# enough that a block's [rows, keys] scores stay in cache for the softmax passes.
BLOCK_ROWS = 128


def _stack_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B * Hkv, T * group, D]: row ``t * group + j`` of a key/value head's matrix is token ``t``
    of its ``j``-th query head."""
    b, hq, t, d = x.shape
    group = hq // kv_heads
    return x.reshape(b, kv_heads, group, t, d).transpose(2, 3).reshape(b * kv_heads, t * group, d)


def _unstack_groups(x: torch.Tensor, batch: int, kv_heads: int, seq: int) -> torch.Tensor:
    """The inverse of :func:`_stack_groups`."""
    group, d = x.shape[1] // seq, x.shape[2]
    return x.view(batch, kv_heads, seq, group, d).transpose(2, 3).reshape(batch, kv_heads * group, seq, d)


def _block_probs(qr: torch.Tensor, kr: torch.Tensor, start: int, end: int, group: int, scale: float) -> torch.Tensor:
    """[B * Hkv, (end - start) * group, end]: the attention probabilities of tokens ``start..end-1`` over the keys
    up to ``end``, the keys after each query masked out."""
    q_pos = torch.arange(start, end, device=qr.device).repeat_interleave(group)[:, None]
    k_pos = torch.arange(end, device=qr.device)[None, :]
    bias = torch.zeros(q_pos.shape[0], end, dtype=qr.dtype, device=qr.device).masked_fill_(k_pos > q_pos, -math.inf)
    rows = slice(start * group, end * group)
    return torch.baddbmm(bias, qr[:, rows], kr[:, :end].mT, alpha=scale).softmax(-1)


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        step = max(1, BLOCK_ROWS // group)
        scale = 1.0 / math.sqrt(d)
        qr = _stack_groups(q, hkv)
        kr, vr = k.reshape(b * hkv, t, d), v.reshape(b * hkv, t, d)
        out = torch.empty_like(qr)
        for start in range(0, t, step):
            end = min(start + step, t)
            probs = _block_probs(qr, kr, start, end, group, scale)
            torch.bmm(probs, vr[:, :end], out=out[:, start * group : end * group])
        ctx.save_for_backward(qr, kr, vr, out)
        ctx.dims = (b, hkv, group, t, d, step, scale)
        return _unstack_groups(out, b, hkv, t)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qr, kr, vr, out = ctx.saved_tensors
        b, hkv, group, t, d, step, scale = ctx.dims
        need_q, need_k, need_v = ctx.needs_input_grad
        go = _stack_groups(grad_out, hkv)
        delta = (go * out).sum(-1, keepdim=True)  # [BH, rows, 1]: rowsum(dP * P), the softmax backward's term
        dq = torch.empty_like(qr) if need_q else None
        dk = torch.zeros_like(kr) if need_k else None
        dv = torch.zeros_like(vr) if need_v else None
        for start in range(0, t, step):
            end = min(start + step, t)
            rows = slice(start * group, end * group)
            probs = _block_probs(qr, kr, start, end, group, scale)
            if dv is not None:
                dv[:, :end].baddbmm_(probs.mT, go[:, rows])
            if dq is None and dk is None:
                continue
            # d scores = P * (dP - rowsum(dP * P)), in place of dP.
            dscores = torch.bmm(go[:, rows], vr[:, :end].mT).sub_(delta[:, rows]).mul_(probs)
            if dq is not None:
                torch.bmm(dscores, kr[:, :end], out=dq[:, rows]).mul_(scale)
            if dk is not None:
                dk[:, :end].baddbmm_(dscores.mT, qr[:, rows], alpha=scale)
        return (
            None if dq is None else _unstack_groups(dq, b, hkv, t),
            None if dk is None else dk.view(b, hkv, t, d),
            None if dv is None else dv.view(b, hkv, t, d),
        )


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, D] over k, v [B, Hkv, T, D] (Hkv divides Hq) -> [B, Hq, T, D]."""
    return _BlockedCausalAttention.apply(q, k, v)

"""The chunked gated delta rule: 64 tokens at a time in the WY/UT representation, with a hand-written backward.

Within a chunk of C tokens (cumulative log-decay ``γ = cumsum(g)``, ``Γ = exp(γ)``, decay mask
``M[i, j] = exp(γ_i - γ_j)`` for ``j <= i``), the C sequential delta-rule writes collapse into one triangular
system: with ``A = strict_lower(diag(β) (K Kᵀ ⊙ M))`` and ``T = (I + A)⁻¹``,

    u = T (β ⊙ V),  w = T (β Γ ⊙ K),  V' = u - w S            (the values actually written, S the chunk's
    O = (Γ ⊙ Q) S + (Q Kᵀ ⊙ M) V',  S_next = Γ_C S + (exp(γ_C - γ) ⊙ K)ᵀ V'     entering state)

so only the short loop over chunks is sequential. The forward keeps its inputs alone for the backward; the
backward recomputes the chunk quantities and the chunk-entry states, then walks the chunks in reverse with the
state's gradient (no autograd graph of the loop: a 2048-token sequence keeps its q, k, v, g, β and nothing
else).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nibble.nn.delta_rule.step import state_dtype

CHUNK = 64


def _chunked(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, *rest] -> [B, H, n, CHUNK, *rest] in ``dtype``, T zero-padded to n * CHUNK."""
    t = x.shape[1]
    pad = (-t) % CHUNK
    x = x.to(dtype)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    b, tp, h = x.shape[:3]
    x = x.view(b, tp // CHUNK, CHUNK, h, *x.shape[3:])  # [B, n, C, H, ...]
    return x.movedim(3, 1).contiguous()  # [B, H, n, C, ...]


def _unchunked(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, H, n, C, *rest] -> [B, T, H, *rest] (the padding dropped)."""
    b, h, n, c = x.shape[:4]
    x = x.movedim(1, 3).reshape(b, n * c, h, *x.shape[4:])  # [B, n*C, H, ...]
    return x[:, :t]


class _Intra:
    """The per-chunk quantities of the forward (see the module docstring), for all chunks at once.

    q [B, H, n, C, Dk] (already scaled), k [.., Dk], v [.., Dv], g, beta [B, H, n, C].
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
        self.gamma = g.cumsum(-1)  # [B, H, n, C]
        causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=g.device).tril()
        diff = self.gamma[..., :, None] - self.gamma[..., None, :]  # [B, H, n, C, C]: γ_i - γ_j
        self.decay_mask = diff.masked_fill(~causal, float("-inf")).exp()  # M
        self.kk = k @ k.transpose(-1, -2)  # [B, H, n, C, C]
        self.a = (beta[..., None] * self.kk * self.decay_mask).tril(-1)  # A (strictly lower)
        eye = torch.eye(CHUNK, dtype=q.dtype, device=q.device)
        self.t = torch.linalg.solve_triangular(self.a + eye, eye.expand_as(self.a), upper=False)  # T = (I + A)^-1
        self.big_gamma = self.gamma.exp()  # Γ [B, H, n, C]
        self.beta_k = k * (beta * self.big_gamma)[..., None]  # β Γ K
        self.u = self.t @ (v * beta[..., None])  # [B, H, n, C, Dv]
        self.w = self.t @ self.beta_k  # [B, H, n, C, Dk]
        self.qk = (q @ k.transpose(-1, -2)) * self.decay_mask  # P = Q Kᵀ ⊙ M
        self.q_gamma = q * self.big_gamma[..., None]  # Γ ⊙ Q
        self.end = self.gamma[..., -1:]  # γ_C [B, H, n, 1]
        self.k_end = k * (self.end - self.gamma).exp()[..., None]  # exp(γ_C - γ) ⊙ K
        self.chunk_decay = self.end[..., 0].exp()  # Γ_C [B, H, n]

    def scan(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Walk the chunks from ``state`` [B, H, Dk, Dv]: V' [B, H, n, C, Dv], the chunks' entry states
        [B, H, n, Dk, Dv] and the final state. Only what needs the previous chunk's state runs in the loop."""
        n = self.u.shape[2]
        written = torch.empty_like(self.u)
        states = state.new_empty(*state.shape[:2], n, *state.shape[2:])
        for i in range(n):
            states[:, :, i] = state
            v_new = self.u[:, :, i] - self.w[:, :, i] @ state  # [B, H, C, Dv]
            written[:, :, i] = v_new
            state = state * self.chunk_decay[:, :, i, None, None] + self.k_end[:, :, i].transpose(-1, -2) @ v_new
        return written, states, state

    def outputs(self, written: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """O [B, H, n, C, Dv] of every chunk at once from :meth:`scan`'s V' and entry states."""
        return self.q_gamma @ states + self.qk @ written


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale):  # type: ignore[override]
        t, group = v.shape[1], v.shape[2] // k.shape[2]
        dtype = state_dtype(v)
        qc, kc = (_chunked(x.repeat_interleave(group, dim=2), dtype) for x in (q, k))  # [B, Hv, n, C, Dk]
        intra = _Intra(qc * scale, kc, _chunked(v, dtype), _chunked(g, dtype), _chunked(beta, dtype))
        b, hv, dk, dv = v.shape[0], v.shape[2], q.shape[3], v.shape[3]
        state = v.new_zeros(b, hv, dk, dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
        written, states, final = intra.scan(state)
        out = intra.outputs(written, states)
        del written, states
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.group = scale, group
        return _unchunked(out, t).to(v.dtype), final

    @staticmethod
    def backward(ctx, d_out, d_final):  # type: ignore[override]
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        scale, group, t = ctx.scale, ctx.group, v.shape[1]
        dtype = state_dtype(v)
        qc, kc = (_chunked(x.repeat_interleave(group, dim=2), dtype) for x in (q, k))  # [B, Hv, n, C, Dk]
        qs, vc, gc, bc = qc * scale, _chunked(v, dtype), _chunked(g, dtype), _chunked(beta, dtype)
        intra = _Intra(qs, kc, vc, gc, bc)
        b, hv, dk, dv = v.shape[0], v.shape[2], q.shape[3], v.shape[3]
        state = v.new_zeros(b, hv, dk, dv, dtype=dtype) if initial_state is None else initial_state.to(dtype)
        written, states, _ = intra.scan(state)
        d_o = _chunked(d_out, dtype)  # [B, H, n, C, Dv]

        # The reverse walk carries the state's gradient; what does not depend on it is computed for all chunks.
        n = written.shape[2]
        d_state = torch.zeros_like(state) if d_final is None else d_final.to(dtype)
        from_output = intra.qk.transpose(-1, -2) @ d_o  # [B, H, n, C, Dv]: dV' from O's intra-chunk term
        state_from_output = intra.q_gamma.transpose(-1, -2) @ d_o  # [B, H, n, Dk, Dv]: dS from O's state term
        d_written = torch.empty_like(written)  # dV'
        d_exits = torch.empty_like(states)  # the gradient of each chunk's exit state
        for i in reversed(range(n)):
            d_exits[:, :, i] = d_state
            dvn = from_output[:, :, i] + intra.k_end[:, :, i] @ d_state  # [B, H, C, Dv]
            d_written[:, :, i] = dvn
            d_state = (
                state_from_output[:, :, i]
                + d_state * intra.chunk_decay[:, :, i, None, None]
                - intra.w[:, :, i].transpose(-1, -2) @ dvn
            )
        del from_output, state_from_output
        d_q_gamma = d_o @ states.transpose(-1, -2)  # d(Γ ⊙ Q) [B, H, n, C, Dk]
        d_k_end = written @ d_exits.transpose(-1, -2)  # d(exp(γ_C - γ) ⊙ K)
        d_chunk_decay = (states * d_exits).sum((-1, -2))  # dΓ_C [B, H, n]
        d_w = -(d_written @ states.transpose(-1, -2))  # [B, H, n, C, Dk]: V' = u - w S

        # Within chunks, all at once. d_gamma collects dL/dγ; g's gradient is its reverse cumulative sum.
        d_p = d_o @ written.transpose(-1, -2)  # dP [B, H, n, C, C] (P is zero above the diagonal)
        d_qk = d_p * intra.decay_mask
        d_q = d_qk @ kc + d_q_gamma * intra.big_gamma[..., None]
        d_k = d_qk.transpose(-1, -2) @ qs + d_k_end * (intra.end - intra.gamma).exp()[..., None]
        f = d_p * intra.qk
        d_gamma = f.sum(-1) - f.sum(-2) + (d_q_gamma * intra.q_gamma).sum(-1)
        e = (d_k_end * intra.k_end).sum(-1)  # [B, H, n, C]
        d_gamma = d_gamma - e
        d_end = e.sum(-1) + d_chunk_decay * intra.chunk_decay  # dγ_C [B, H, n]

        t_mat = intra.t.transpose(-1, -2)  # Tᵀ
        d_bv = t_mat @ d_written  # d(β ⊙ V)
        d_bk = t_mat @ d_w  # d(β Γ ⊙ K)
        d_a = -(d_bv @ intra.u.transpose(-1, -2) + d_bk @ intra.w.transpose(-1, -2)).tril(-1)  # dA
        d_kk = d_a * bc[..., None] * intra.decay_mask  # d(K Kᵀ)
        d_k = d_k + (d_kk + d_kk.transpose(-1, -2)) @ kc + d_bk * (bc * intra.big_gamma)[..., None]
        d_beta = (d_a * intra.kk * intra.decay_mask).sum(-1) + (d_bv * vc).sum(-1)
        d_beta = d_beta + (d_bk * kc).sum(-1) * intra.big_gamma
        ea = d_a * intra.a
        d_gamma = d_gamma + ea.sum(-1) - ea.sum(-2) + (d_bk * intra.beta_k).sum(-1)
        d_gamma[..., -1] += d_end
        d_v = d_bv * bc[..., None]
        d_g = d_gamma.flip(-1).cumsum(-1).flip(-1)  # γ = cumsum(g)

        d_q, d_k = (_unchunked(x, t) for x in (d_q * scale, d_k))  # [B, T, Hv, Dk]
        d_q, d_k = (x.unflatten(2, (-1, group)).sum(3) for x in (d_q, d_k))  # summed over each key head's group
        d_init = d_state.to(initial_state.dtype) if initial_state is not None else None
        return (
            d_q.to(q.dtype), d_k.to(k.dtype), _unchunked(d_v, t).to(v.dtype), _unchunked(d_g, t).to(g.dtype),
            _unchunked(d_beta, t).to(beta.dtype), d_init, None,
        )  # fmt: skip


def chunk_gated_delta_rule(
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
    """The gated delta rule over whole sequences (see the package docstring).

    Args:
        q, k: [B, T, Hk, Dk] (L2-normalized by the caller if the model wants it).
        v: [B, T, Hv, Dv], Hv a multiple of Hk; value heads ``j * Hv/Hk ... (j+1) * Hv/Hk - 1`` read key head j.
        g: [B, T, Hv] log-decays (<= 0); beta: [B, T, Hv] write strengths.
        scale: multiplies q (default ``Dk ** -0.5``).
        initial_state: [B or S, Hv, Dk, Dv] state before the first token (default zeros).
        cu_seqlens: [S + 1] int64 offsets of S sequences laid end to end in one row (B must be 1).

    Returns:
        The output [B, T, Hv, Dv] in ``v``'s dtype and the final states [B or S, Hv, Dk, Dv] (fp32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        return _ChunkGatedDeltaRule.apply(q, k, v, g, beta, initial_state, scale)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the sequences in one row (batch 1), got batch {q.shape[0]}")
    # The sequences side by side, each from position 0 of its own row, zero-padded to a whole number of chunks:
    # zero g and beta leave a state as it was, so the padding changes no output and no final state.
    lengths = cu_seqlens.diff()  # [S]
    rows = int(lengths.max()) + (-int(lengths.max())) % CHUNK if len(lengths) else CHUNK
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths, output_size=q.shape[1])
    index = seq * rows + torch.arange(q.shape[1], device=q.device) - cu_seqlens[seq]  # [T]: token -> row slot

    def spread(x: torch.Tensor) -> torch.Tensor:  # [1, T, ...] -> [S, rows, ...]
        out = x.new_zeros(len(lengths) * rows, *x.shape[2:]).index_copy(0, index, x[0])
        return out.view(len(lengths), rows, *x.shape[2:])

    out, final = _ChunkGatedDeltaRule.apply(*map(spread, (q, k, v, g, beta)), initial_state, scale)
    return out.flatten(0, 1).index_select(0, index)[None], final

"""Linear + cross-entropy in chunks of rows: the loss of an LM head without its [N, vocab] logits.

``linear_cross_entropy(hidden, weight, targets)`` equals ``F.cross_entropy((hidden @ weight.T).float(),
targets)``; ``linear_log_probs`` gives each row's log-probability of its target instead (what preference losses
sum per sequence). The logits of one chunk of rows exist at a time: the forward computes each chunk's loss and,
while its logits are at hand, the chunk's gradients for ``hidden`` and ``weight``; the backward only scales
them. The memory the loss needs is one chunk of fp32 logits instead of several [N, vocab] tensors (logits,
their fp32 copy, the log-softmax kept for backward and its gradient).
"""

from __future__ import annotations

import torch

from nibble import kernels

# fp32 logits of one chunk on a CPU: 2**22 elements (16 MiB) — 85 rows at vocab 49152, 27 at 151936, which keeps a
# chunk in the caches.
CHUNK_ELEMENTS = 1 << 22
# On an accelerator: 2**28 elements (1 GiB of fp32 logits, 1.5 GiB with its bf16 gradient) — 1766 rows at vocab
# 151936, 5461 at 49152, 1024 at 262144. Each chunk reads the whole head twice (logits, grad-input) and its three
# matmuls want thousands of rows to run at tensor-core speed; 27-row chunks would be ~93 memory-bound launches per
# micro-batch of 2.5k targets.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 28


def chunk_elements(device_type: str) -> int:
    """fp32 logits of one chunk on a device of ``device_type`` (what the memory planner counts, too)."""
    return CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def default_chunk_rows(hidden: torch.Tensor, vocab: int) -> int:
    """Rows per chunk for ``hidden``'s device: as many as fit :func:`chunk_elements` fp32 logits (at least one)."""
    return max(1, chunk_elements(hidden.device.type) // vocab)


def add_head_grad(grad_w: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """``grad_w [V, H] (fp32) += grad_logits[c, V].T @ h [c, H]``. On CUDA the operands stay in the compute dtype
    (bf16/fp16 tensor cores) and the products accumulate into fp32 (``out_dtype``); elsewhere they are widened to
    fp32 first (a CPU has no faster bf16 path to trade the exactness for)."""
    if grad_w.device.type in ("cuda", "meta") and grad_logits.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(grad_w, grad_logits.T, h.to(grad_logits.dtype), out_dtype=torch.float32, out=grad_w)
    else:
        grad_w.addmm_(grad_logits.T.float(), h.float())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, sum_reduction, chunk_rows):  # type: ignore[override]
        n = hidden.shape[0]
        scale = 1.0 if sum_reduction else 1.0 / max(n, 1)
        w = weight.to(hidden.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows]  # [c, H]
            t = targets[start : start + chunk_rows]  # [c]
            logits = kernels.linear(h, w).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d loss / d logits = (softmax - one_hot(target)) * scale, built in place of the logits and
                # scaled before any cast to the compute dtype, as the full path rounds it.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad_logits = grad_logits.mul_(scale).to(hidden.dtype)
                if need_h:
                    grad_h[start : start + chunk_rows] = kernels.linear(grad_logits, w.T)  # @ w
                if need_w:
                    add_head_grad(grad_w, grad_logits, h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` (fp32 softmax) against ``targets``, chunk by chunk.

    Args:
        hidden: [N, H] in the compute dtype (the matmul runs in it, as the LM head would).
        weight: [V, H] the LM head; cast to ``hidden.dtype`` for the matmul; its gradient is fp32-accumulated.
        targets: [N] token ids.
        reduction: "mean" or "sum" over the N rows.
        chunk_rows: rows per chunk (default: :func:`default_chunk_rows`).

    Returns:
        A scalar fp32 loss. Zero rows give a zero loss that still backpropagates (to nothing).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    rows = chunk_rows or default_chunk_rows(hidden, weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, reduction == "sum", rows)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):  # type: ignore[override]
        n = hidden.shape[0]
        w = weight.to(hidden.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # d logp / d hidden per row at unit upstream gradient; backward scales each row by its own gradient
        unit_h = torch.empty_like(hidden) if need_h else None
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows]  # [c, H]
            t = targets[start : start + chunk_rows]  # [c]
            logits = kernels.linear(h, w).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            out[start : start + chunk_rows] = logits.gather(1, t[:, None]).squeeze(1) - lse
            if need_h:
                grad_logits = logits.sub_(lse[:, None]).exp_().neg_()  # one_hot(target) - softmax
                grad_logits[torch.arange(t.numel(), device=t.device), t] += 1.0
                unit_h[start : start + chunk_rows] = kernels.linear(grad_logits.to(hidden.dtype), w.T)
        # the weight's gradient needs each row's upstream gradient: recomputed chunk by chunk in backward
        ctx.save_for_backward(unit_h, hidden if need_w else None, weight if need_w else None, targets)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        unit_h, hidden, weight, targets = ctx.saved_tensors
        gh = unit_h * grad_out[:, None].to(unit_h.dtype) if unit_h is not None else None
        gw = None
        if weight is not None:
            w, rows = weight.to(hidden.dtype), ctx.chunk_rows
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], rows):
                h, t = hidden[start : start + rows], targets[start : start + rows]
                logits = kernels.linear(h, w).float()  # [c, V]
                g = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_().neg_()
                g[torch.arange(t.numel(), device=t.device), t] += 1.0
                g = g.mul_(grad_out[start : start + rows, None].float()).to(hidden.dtype)
                add_head_grad(grad_w, g, h)
            gw = grad_w.to(weight.dtype)
        return gh, gw, None, None


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Each row's log-probability of its target under the logits ``hidden @ weight.T`` (fp32 log-softmax), chunk by
    chunk: ``log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)``.

    Args:
        hidden: [N, H] in the compute dtype.
        weight: [V, H] the LM head (its gradient, when it needs one, is recomputed chunk by chunk in backward).
        targets: [N] token ids.
        chunk_rows: rows per chunk (default: :func:`default_chunk_rows`).

    Returns:
        [N] fp32 log-probabilities.
    """
    rows = chunk_rows or default_chunk_rows(hidden, weight.shape[0])
    return _LinearLogProbs.apply(hidden, weight, targets, rows)

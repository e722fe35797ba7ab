"""Causal grouped-query attention on CPU: nibble's blocked attention vs PyTorch's fused SDPA kernel.

Times forward + backward (training) and forward alone (evaluation) of
``nibble.nn.attention.blocked_causal_attention`` against ``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`` on the same inputs (fp32, batch x tokens fixed), for the head layouts of real models, and
prints the largest difference of the outputs and gradients. ``nibble.model.model.attend`` uses the blocked
path where this table shows it faster: training with grouped heads at ``BLOCKED_TOKENS`` tokens.

    .venv/bin/python benchmarks/bench_attention.py [--tokens 2048] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nibble.model.model import BLOCKED_TOKENS
from nibble.nn.attention import blocked_causal_attention

# (name, query heads, key/value heads, head dim)
LAYOUTS = [
    ("SmolLM2-135M", 9, 3, 64),
    ("Qwen2.5-0.5B", 14, 2, 64),
    ("Qwen3-0.6B", 16, 8, 128),
    ("Llama-3.2-1B", 32, 8, 64),
]
LENGTHS = (128, 256, 512, 768, 1024)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def best_ms(fn, inputs, grad_out, train: bool, repeats: int) -> float:
    def once():
        out = fn(*inputs)
        if train:
            out.backward(grad_out)

    once()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def largest_difference(inputs, grad_out) -> float:
    results = []
    for fn in (blocked_causal_attention, sdpa):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    return max((a - b).abs().max().item() for a, b in zip(*results, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="batch x sequence length of every case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    window = f"{BLOCKED_TOKENS.start}-{BLOCKED_TOKENS.stop - 1}"
    print(
        f"# torch {torch.__version__}, {args.threads} thread(s), {args.tokens} tokens a case, fp32, best of "
        f"{args.repeats}; nibble trains with the blocked path at {window} tokens\n"
    )
    print(
        "| model heads | T | train: SDPA ms | blocked ms | speed-up | eval: SDPA ms | blocked ms | speed-up "
        "| max diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, hq, hkv, dim in LAYOUTS:
        for length in LENGTHS:
            batch = max(1, args.tokens // length)
            inputs = [torch.randn(batch, h, length, dim, generator=gen).requires_grad_(True) for h in (hq, hkv, hkv)]
            grad_out = torch.randn(batch, hq, length, dim, generator=gen)
            row = []
            for train in (True, False):
                with torch.set_grad_enabled(train):
                    ref = best_ms(sdpa, inputs, grad_out, train, args.repeats)
                    ours = best_ms(blocked_causal_attention, inputs, grad_out, train, args.repeats)
                row += [f"{ref:.1f}", f"{ours:.1f}", f"{ref / ours:.2f}x"]
            diff = largest_difference(inputs, grad_out)
            print(f"| {name} {hq}/{hkv}x{dim} | {length} | " + " | ".join(row) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

"""Causal grouped-query attention on CPU: nibble's blocked attention vs PyTorch's fused SDPA kernel.

Times forward + backward (training) and forward alone (evaluation) of
``nibble.nn.attention.blocked_causal_attention`` against ``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`` on the same inputs (fp32, batch x tokens fixed), for the head layouts of real models, and
prints the largest difference of the outputs and gradients. ``nibble.model.model.attend`` uses the blocked
path where this table shows it faster: training with grouped heads at ``BLOCKED_TOKENS`` tokens.

    .venv/bin/python benchmarks/bench_attention.py [--tokens 2048] [--threads 1] [--repeats 3]

With ``--bf16`` it times instead, for training (forward + backward), PyTorch's bf16 SDPA kernel against the same
attention on fp32 units (bf16 inputs upcast, the output rounded back), which ``attend`` uses on a CPU with
native bf16 arithmetic up to ``FP32_ATTENTION_MAX_KEYS`` keys (and always on a CPU without it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nibble.devices import cpu_has_native_bf16
from nibble.kernels.reference import FP32_ATTENTION_MAX_KEYS
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


def sdpa_on_fp32_units(q, k, v):
    return sdpa(q.float(), k.float(), v.float()).to(q.dtype)


def bf16_table(tokens: int, repeats: int) -> None:
    flags = " ".join(sorted({f for f in open("/proc/cpuinfo").read().split() if "bf16" in f})) or "none"
    native = cpu_has_native_bf16()
    print(f"# bf16 attention, train (fwd + bwd); CPU bf16 flags: {flags}; native bf16 as nibble sees it: {native}; ")
    print(f"# attend uses fp32 units up to {FP32_ATTENTION_MAX_KEYS} keys\n")
    print("| model heads | T | bf16 SDPA ms | fp32 units ms | fp32 units speed-up |")
    print("|---|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for name, hq, hkv, dim in LAYOUTS:
        for length in (40, 64, 128, 256, 512, 1024):
            batch = max(1, tokens // length)
            inputs = [torch.randn(batch, h, length, dim, generator=gen).bfloat16() for h in (hq, hkv, hkv)]
            inputs = [t.requires_grad_(True) for t in inputs]
            grad_out = torch.randn(batch, hq, length, dim, generator=gen).bfloat16()
            native = best_ms(sdpa, inputs, grad_out, True, repeats)
            upcast = best_ms(sdpa_on_fp32_units, inputs, grad_out, True, repeats)
            print(f"| {name} {hq}/{hkv}x{dim} | {length} | {native:.2f} | {upcast:.2f} | {native / upcast:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="batch x sequence length of every case")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 SDPA against attention on fp32 units")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.bf16:
        bf16_table(args.tokens, args.repeats)
        return
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

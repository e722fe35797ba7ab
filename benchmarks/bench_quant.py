"""Quantize/dequantize speed vs bitsandbytes' CPU path, and QuantLinear vs dense F.linear.

Run: .venv/bin/python benchmarks/bench_quant.py [--size 4096]
Prints markdown tables; ratios compare against a reference measured in the same run.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from nibble.nn import QuantLinear
from nibble.quant import int4, nf4
from timing import best_of


def quant_table(size: int) -> list[str]:
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    rows = ["| op | nibble ms | bitsandbytes ms | speed-up | bytes equal |", "|---|---:|---:|---:|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(size, size).to(dtype)
        for dq in (False, True):
            ours = nf4.quantize(w, 64, dq)
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            same = torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.absmax, state.absmax)
            t_ours = best_of(lambda w=w, dq=dq: nf4.quantize(w, 64, dq), 5, warm_up=True)
            t_bnb = best_of(
                lambda w=w, dq=dq: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq),
                5,
                warm_up=True,
            )
            name = f"quantize nf4 {str(dtype).removeprefix('torch.')}{' +dq' if dq else ''}"
            rows.append(f"| {name} | {t_ours * 1e3:.1f} | {t_bnb * 1e3:.1f} | {t_bnb / t_ours:.2f}x | {same} |")
            d_ours = best_of(lambda ours=ours, dtype=dtype: ours.dequantize(dtype), 5, warm_up=True)
            d_bnb = best_of(lambda p=packed, s=state: bnbf.dequantize_4bit(p, s), 5, warm_up=True)
            same = torch.equal(ours.dequantize(dtype), bnbf.dequantize_4bit(packed, state))
            name = name.replace("quantize", "dequantize")
            rows.append(f"| {name} | {d_ours * 1e3:.1f} | {d_bnb * 1e3:.1f} | {d_bnb / d_ours:.2f}x | {same} |")
    w = torch.randn(size, size)
    t_int4 = best_of(lambda: int4.quantize(w, 128), 5, warm_up=True)
    q4 = int4.quantize(w, 128)
    d_int4 = best_of(lambda: q4.dequantize(), 5, warm_up=True)
    rows.append(f"| quantize int4 g128 float32 | {t_int4 * 1e3:.1f} | - | - | - |")
    rows.append(f"| dequantize int4 g128 float32 | {d_int4 * 1e3:.1f} | - | - | - |")
    return rows


def linear_table(size: int) -> list[str]:
    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    rows = [
        "| M | dtype | dense F.linear ms | QuantLinear nf4 ms | ratio | nf4 + cache ms | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        dense = w.to(dtype)
        plain = QuantLinear.from_dense(w)
        cached = QuantLinear.from_dense(w, cache_dequantized=True)
        for m in (1, 16, 512):
            x = torch.randn(m, size).to(dtype)
            with torch.no_grad():
                t_dense = best_of(lambda x=x, dense=dense: F.linear(x, dense), 5, warm_up=True)
                t_plain = best_of(lambda x=x, layer=plain: layer(x), 5, warm_up=True)
                t_cached = best_of(lambda x=x, layer=cached: layer(x), 5, warm_up=True)
            rows.append(
                f"| {m} | {str(dtype).removeprefix('torch.')} | {t_dense * 1e3:.2f} | {t_plain * 1e3:.2f} | "
                f"{t_plain / t_dense:.2f}x | {t_cached * 1e3:.2f} | {t_cached / t_dense:.2f}x |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"\n## NF4/INT4 quantize and dequantize, {args.size}x{args.size} (best of 5)\n")
    print("\n".join(quant_table(args.size)))
    print(f"\n## QuantLinear forward vs dense, {args.size}x{args.size} weight (lower ratio is better)\n")
    print("\n".join(linear_table(args.size)))


if __name__ == "__main__":
    main()

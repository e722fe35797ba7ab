"""``nibble demo``: quantize a random weight to NF4 and INT4 and report what happened."""

from __future__ import annotations

import argparse
import time

import torch

from nibble.nn import QuantLinear


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a short demonstration of what nibble does")
    parser.add_argument("--size", type=int, default=1024, help="rows and columns of the demo weight (default 1024)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    size = args.size
    weight = torch.randn(size, size) * 0.02
    x = torch.randn(8, size)
    dense_bytes = weight.numel() * 4
    print(f"demo: a random {size}x{size} fp32 weight ({dense_bytes / 2**20:.1f} MiB)")
    for fmt, options in (("nf4", {"double_quant": True}), ("int4", {"group_size": 128})):
        start = time.perf_counter()
        layer = QuantLinear.from_dense(weight, format=fmt, **options)
        seconds = time.perf_counter() - start
        restored = layer.dequantize()
        err = (restored - weight).abs()
        y_err = (layer(x) - x @ weight.T).abs().max().item()
        size_mib = layer.qweight.memory_bytes() / 2**20
        print(
            f"  {fmt}: {size_mib:.2f} MiB ({dense_bytes / layer.qweight.memory_bytes():.1f}x smaller) in "
            f"{seconds * 1000:.0f} ms; weight error mean {err.mean():.2e} max {err.max():.2e}; "
            f"matmul max error {y_err:.2e}"
        )
    print("done: nibble stores frozen weights in 4 bits and multiplies with them directly.")
    return 0

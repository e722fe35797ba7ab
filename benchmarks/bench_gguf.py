"""GGUF block types: nibble's torch dequantize vs the gguf package's numpy one, the quantizers, and a GGUF file's own
blocks as a QLoRA base vs the same file re-quantized to NF4.

    .venv/bin/python benchmarks/bench_gguf.py [--size 2048] [--model FILE.gguf]

Tables (best of --repeat runs; ratios against the reference measured in the same run):
1. dequantize a ``size x size`` weight per type: nibble (torch, fp32) vs gguf (numpy); values bit-equal?
2. quantize: nibble's Q4_K / Q6_K (llama.cpp's reference search) and the gguf package's 32-block types.
3. the demo's SmolLM2-135M-Instruct (Q4_1) loaded with ``--quant-format gguf`` vs ``nf4``: bytes of the
   frozen projections, load time, and one QLoRA forward + backward (batch 4 x 128, all-linear rank 8,
   no dense-copy cache so every step dequantizes).
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np
import torch

from nibble.io.fetch import fetch_smollm2
from nibble.model import load_model
from nibble.nn import QuantLinear, apply_lora
from nibble.quant.gguf import dequantize_blocks, quantize_blocks
from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", help="a .gguf file (default: the demo's SmolLM2-135M-Instruct Q4_1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size) * 0.02
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight {args.size}x{args.size}\n")

    print("| type | nibble dequantize ms | gguf dequantize ms | speed-up | bit-equal |")
    print("|---|---:|---:|---:|---|")
    for kind in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"):
        if kind == "Q5_K":  # no quantizer: random blocks with finite scales
            data = torch.randint(0, 256, (args.size, args.size // 256 * 176), dtype=torch.uint8)
            data.view(-1, 176)[:, :4] = torch.tensor([0.01, 0.001], dtype=torch.float16).view(torch.uint8)
        else:
            data = quantize_blocks(w, kind)
        qtype = gguf.GGMLQuantizationType[kind]
        ours = best_of(lambda data=data, kind=kind: dequantize_blocks(data, kind), args.repeat) * 1e3
        theirs = best_of(lambda data=data, qtype=qtype: gguf.quants.dequantize(data.numpy(), qtype), args.repeat) * 1e3
        equal = np.array_equal(
            dequantize_blocks(data, kind).numpy().view(np.uint32),
            np.asarray(gguf.quants.dequantize(data.numpy(), qtype), np.float32).view(np.uint32),
        )
        print(f"| {kind} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x | {equal} |")

    print("\n| type | quantize ms | by | µs per 1k values | relative RMS error |")
    print("|---|---:|---|---:|---:|")
    for kind in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"):
        ms = best_of(lambda kind=kind: quantize_blocks(w, kind), 1) * 1e3
        err = (dequantize_blocks(quantize_blocks(w, kind), kind) - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
        by = "nibble" if kind.endswith("_K") else "gguf package"
        print(f"| {kind} | {ms:.0f} | {by} | {ms * 1e6 / w.numel():.1f} | {float(err):.4f} |")

    path = args.model or fetch_smollm2()
    print(f"\n{path}: QLoRA base")
    print("| base | projection MB | load s | forward+backward ms | ratio to nf4 |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    ids = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(0))
    for fmt in ("nf4", "gguf"):
        start = time.perf_counter()
        model = load_model(path, quantize=fmt)
        load_s = time.perf_counter() - start
        size = sum(m.qweight.memory_bytes() for m in model.modules() if isinstance(m, QuantLinear))
        apply_lora(model, "all-linear", rank=8, alpha=16)

        def step(model=model) -> None:
            model(ids).float().logsumexp(-1).mean().backward()

        step()
        rows[fmt] = (size, load_s, best_of(step, args.repeat) * 1e3)
    for fmt, (size, load_s, ms) in rows.items():
        print(f"| {fmt} | {size / 1e6:.1f} | {load_s:.1f} | {ms:.0f} | {ms / rows['nf4'][2]:.2f}x |")


if __name__ == "__main__":
    main()

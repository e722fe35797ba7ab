"""Loading a model in 4 bits with the on-disk 4-bit cache: the first load quantizes (and writes the cache), later
loads read it. Each load runs in a fresh process with an empty or a filled cache; the table shows wall and CPU
seconds, the ratio to quantizing, and whether the weights are bit-identical (a SHA-256 over every 4-bit tensor).

    .venv/bin/python benchmarks/bench_quant_cache.py                 # SmolLM2-135M-Instruct (fetched, cached)
    .venv/bin/python benchmarks/bench_quant_cache.py --model DIR --format int4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def child(path: str, fmt: str, double_quant: bool) -> None:
    """Runs in a fresh process: load with quantize, report JSON on stdout."""
    import torch

    import nibble
    from nibble.model import loading  # noqa: F401  (imports before the clock starts)
    from nibble.nn import QuantLinear
    from nibble.quant import QuantSpec

    spec = QuantSpec(fmt, double_quant=double_quant)
    cpu_start, start = time.process_time(), time.perf_counter()
    model = nibble.load_model(path, quantize=spec)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    digest = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            for key, t in sorted(m.qweight.tensors().items()):
                digest.update(f"{name}.{key}".encode())
                digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    print(json.dumps({"seconds": seconds, "cpu": cpu, "digest": digest.hexdigest()}))


def run_child(path: str, args: argparse.Namespace, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--format", args.format]
    cmd += ["--double-quant"] if args.double_quant else []
    env = {**os.environ, "NIBBLE_CACHE": cache}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--format", default="nf4", choices=["nf4", "int4"])
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="cached loads to time")
    parser.add_argument("--child", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.format, args.double_quant)
        return

    from nibble.io.fetch import fetch_smollm2
    from nibble.model.loading import resolve_model_dir

    path = str(resolve_model_dir(args.model or fetch_smollm2()))  # converted once, outside the timed loads
    with tempfile.TemporaryDirectory(prefix="nibble-bench-cache-") as cache:
        rows = [("quantize (empty cache)", run_child(path, args, cache))]
        rows += [(f"cached load {i + 1}", run_child(path, args, cache)) for i in range(args.repeat)]
    ref = rows[0][1]
    print(f"{path}, {args.format}{' +dq' if args.double_quant else ''}")
    print()
    print("| load | wall s | CPU s | wall vs quantize | CPU vs quantize | weights equal |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['seconds']:.2f} | {r['cpu']:.2f} | {r['seconds'] / ref['seconds']:.2f}x "
            f"| {r['cpu'] / ref['cpu']:.2f}x | {r['digest'] == ref['digest']} |"
        )


if __name__ == "__main__":
    main()

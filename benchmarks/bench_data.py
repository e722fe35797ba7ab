"""Training data larger than memory: peak RSS of ``nibble train`` as the data file grows, against holding the
rows in memory (the texts read into Python rows and tokenized into lists, as a dataset kept in RAM does).

For each row count a JSONL classification file of short rows is written (short rows make the per-row cost of
in-memory rows largest relative to the file). In fresh processes: ``nibble train`` (2 steps, LoRA, 1% val
split, a tiny random Qwen3) with an empty token cache, which streams the rows into the cache and trains from
the memory map; and the reference, which reads every row and tokenizes them all in one call into Python lists
that it keeps (what nibble did before the token cache, and what a dataset held in RAM does).
Each reports its peak RSS (VmHWM); the table shows the growth over the smallest file. A second ``nibble
train`` on the same file shows the time the cache saves.

    .venv/bin/python benchmarks/bench_data.py --rows 10000 100000 300000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NIBBLE = """
import sys
from nibble.cli.main import main
assert main(sys.argv[1:]) == 0
print("PEAK_KIB", [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""
IN_MEMORY = """
import sys
from nibble.data.classify import read_rows, tokenize_rows
from nibble.io.tokenizer import load_tokenizer
rows = read_rows(sys.argv[1])
ids = tokenize_rows(rows, load_tokenizer(sys.argv[2]), 32, sys.argv[1])
print("PEAK_KIB", [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""
WORDS = {"neg": ["bad", "awful", "poor"], "pos": ["good", "great", "fine"], "meh": ["okay", "plain", "fair"]}


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            text = " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"text": text, "label": label}) + "\n")


def run(code: str, *args: object, env: dict[str, str]) -> tuple[float, str]:
    """Peak RSS (MiB) and stdout of ``python -c code args``."""
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return int(re.search(r"PEAK_KIB (\d+)", result.stdout).group(1)) / 1024, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import helpers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NIBBLE_TOKEN_CACHE": str(root / "tokens")}
        table = []
        for n in sorted(args.rows):
            data = root / f"rows-{n}.jsonl"
            write_rows(data, n)
            train = ["train", "--model", base, "--data", data, "--max-steps", 2, "--batch-size", 4, "--max-seq-len"]
            train += [32, "--eval-every", 0, "--save-every", 0, "--method", "lora", "--val-split", 0.01, "--overwrite"]
            start = time.perf_counter()
            ours, printed = run(NIBBLE, *train, "--output", root / "out", env=env)
            first = time.perf_counter() - start
            built = float(re.search(r"tokenized in ([\d.]+) s", printed).group(1))
            start = time.perf_counter()
            run(NIBBLE, *train, "--output", root / "out", env=env)
            again = time.perf_counter() - start
            reference, _ = run(IN_MEMORY, data, base, env=env)
            table.append((n, data.stat().st_size / 2**20, ours, reference, built, first, again))
        print(
            "| rows | file MiB | nibble train peak RSS MiB | growth | in-memory rows peak RSS MiB | growth "
            "| growth ratio | cache build s | train s (build) | train s (reuse) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        n0, _, ours0, ref0, *_ = table[0]
        for n, size, ours, ref, built, first, again in table:
            grown, ref_grown = ours - ours0, ref - ref0
            ratio = f"{ref_grown / grown:.1f}x" if n != n0 and grown > 0 else "-"
            print(
                f"| {n:,} | {size:.1f} | {ours:.0f} | {grown:+.0f} | {ref:.0f} | {ref_grown:+.0f} | {ratio} "
                f"| {built:.1f} | {first:.1f} | {again:.1f} |"
            )


if __name__ == "__main__":
    main()

"""The real check of GRPO: SmolLM2-135M-Instruct (the demo's GGUF) with QLoRA learns to answer small sums right and
as asked.

Prompts are generated (``What is 17 + 25? Reply with the number only.``, as chat messages) with the right sum in
an ``answer`` column: 80% trained, 20% held out. The rewards are built-ins: ``answer_only`` (``exact`` on the whole
completion: 1 when it is the sum and nothing else) and ``right_number`` (``exact`` on its last number, weight 0.2),
so a run cannot gain by a format alone (a first try with 0.5 for "a number and nothing else" learned to answer
"1" to everything).

The run evaluates before its first step (``eval_at_start``: the adapter's B is zero, so that is the base model)
and at the end, answering the held-out prompts greedily; the script prints both mean rewards, each reward's
share, and a few held-out completions before and after (from the run's ``samples.jsonl``).

    .venv/bin/python benchmarks/check_grpo.py                        # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nibble  # noqa: E402
from nibble.io.fetch import fetch_smollm2  # noqa: E402

REWARDS = [
    {"type": "exact", "parse": "text", "name": "answer_only"},
    {"type": "exact", "parse": "last_number", "name": "right_number", "weight": 0.2},
]


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct sums of two numbers below 50, as chat prompts with the answer beside them."""
    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(1, 50) for b in range(1, 50)], n)
    ask = "What is {} + {}? Reply with the number only."
    return [{"prompt": [{"role": "user", "content": ask.format(a, b)}], "answer": str(a + b)} for a, b in pairs]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluations(output: Path) -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=240)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step (a multiple of G)")
    parser.add_argument("--max-completion-len", type=int, default=16)
    args = parser.parse_args()
    gguf = fetch_smollm2()
    rows = make_prompts(args.prompts)
    cut = int(0.8 * len(rows))
    work = Path(tempfile.mkdtemp(prefix="nibble-grpo-"))
    train, held = write(work / "train.jsonl", rows[:cut]), write(work / "held.jsonl", rows[cut:])
    print(f"{cut} training prompts, {len(rows) - cut} held out; {work}", flush=True)
    started = time.perf_counter()
    result = nibble.train(
        dict(
            task="grpo", model=str(gguf), data=str(train), val_data=str(held), output=str(work / "run"),
            max_steps=args.steps, batch_size=args.batch_size, num_generations=args.generations,
            max_completion_len=args.max_completion_len, max_seq_len=96, temperature=1.0, rewards=REWARDS,
            lr=args.lr, lora_rank=16, lora_targets="all-linear", eval_at_start=True, eval_every=args.steps,
            log_every=10, save_every=0, device="cpu", dtype="float32", warmup_ratio=0.05,
        )
    )  # fmt: skip
    took = time.perf_counter() - started
    evals = evaluations(work / "run")
    print(f"\n{result.step} steps in {took:.0f} s; held-out mean reward (greedy, {len(rows) - cut} prompts):")
    for record in evals:
        shares = {k: round(v, 3) for k, v in record.items() if k.startswith("reward")}
        print(f"  step {record['step']:>3}: {shares}")
    samples = [json.loads(line) for line in (work / "run" / "samples.jsonl").read_text().splitlines()]
    held_count = len(rows) - cut  # each evaluation appends one record per held-out prompt
    for record, start in zip(evals, range(0, len(samples), held_count), strict=False):
        print(f"\ncompletions at step {record['step']}:")
        for s in samples[start : start + 4]:
            print(f"  {s['completion']!r}  rewards {s['rewards']}")


if __name__ == "__main__":
    main()

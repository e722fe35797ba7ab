"""The real check of preference tuning: DPO and ORPO with QLoRA on SmolLM2-135M-Instruct (the demo's GGUF) over
generated pairs (benchmarks/make_pairs.py: arithmetic right/wrong, numbered list/run-on line), 80% trained, 20%
held out.

For the base model and for each tuned adapter it prints the held-out preference accuracy by likelihood (the shares
of pairs whose chosen completion has the higher summed and the higher mean token log-probability: what the base
model prefers, and the tuned policy), by kind; for DPO also the accuracy of its implicit reward (``beta`` x
log-ratio to the base, the run's own ``accuracy``); and the greedy continuation of a held-out list prompt by the
base and by each adapter.

    .venv/bin/python benchmarks/check_preference.py                 # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nibble  # noqa: E402
from make_pairs import make_pairs  # noqa: E402
from nibble.data.batching import iter_batches  # noqa: E402
from nibble.data.preference import Truncation, load_pairs  # noqa: E402
from nibble.devices import autocast  # noqa: E402
from nibble.io.fetch import fetch_smollm2  # noqa: E402
from nibble.model.generate import generate, load_generator  # noqa: E402
from nibble.train.tasks.preference import sequence_logps  # noqa: E402

PROMPT = "Q: Name three birds.\nA:"  # a topic the pairs never ask for


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def likelihood_accuracy(model, tokenizer, path: Path) -> tuple[float, float]:
    """The shares of held-out pairs whose chosen completion has the higher summed / mean token log-prob."""
    data = load_pairs(path, tokenizer, Truncation(64))
    by_sum = by_mean = 0
    with torch.no_grad(), autocast(torch.device("cpu"), torch.float32):
        for _, batch in iter_batches(data, 16, tokenizer.pad_id):
            chosen, rejected = sequence_logps(model, batch).chunk(2)
            n_chosen, n_rejected = batch["completion_tokens"].float().chunk(2)
            by_sum += int((chosen > rejected).sum())
            by_mean += int((chosen / n_chosen > rejected / n_rejected).sum())
    return by_sum / len(data), by_mean / len(data)


def continuation(model, tokenizer) -> str:
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    return tokenizer.decode(generate(model, ids, max_new_tokens=20, eos_token_id=tokenizer.eos_id))


def report(name: str, model, tokenizer, held: dict[str, Path]) -> None:
    accs = "  ".join(
        "{} {:.3f}/{:.3f}".format(kind, *likelihood_accuracy(model, tokenizer, path)) for kind, path in held.items()
    )
    print(f"{name:<10} likelihood accuracy (sum/mean): {accs}   continuation: {continuation(model, tokenizer)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--losses", default="sigmoid,orpo")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    gguf = fetch_smollm2()
    rows = make_pairs(args.rows)
    cut = int(0.8 * len(rows))
    work = Path(tempfile.mkdtemp(prefix="nibble-pref-"))
    train, held_rows = write(work / "train.jsonl", rows[:cut]), rows[cut:]
    held = {"all": write(work / "held.jsonl", held_rows)}
    for kind in ("arithmetic", "formatting"):
        held[kind] = write(work / f"held-{kind}.jsonl", [r for r in held_rows if r["kind"] == kind])
    print(f"{cut} training pairs, {len(held_rows)} held out; {work}", flush=True)
    base, tokenizer = load_generator(gguf, quantize="nf4")
    report("base (nf4)", base, tokenizer, held)
    del base
    for loss in args.losses.split(","):
        started = time.perf_counter()
        result = nibble.train(
            dict(
            task="preference", loss=loss, model=str(gguf), data=str(train), val_data=str(held["all"]),
            output=str(work / loss), epochs=args.epochs, batch_size=8, lr=args.lr, lora_rank=16,
            lora_targets="all-linear", max_seq_len=64, eval_every=0, log_every=6, save_every=0, device="cpu",
            dtype="float32", warmup_ratio=0.1,
            )
        )  # fmt: skip
        took = time.perf_counter() - started
        tuned, tokenizer = load_generator(gguf, result.final)
        print(f"{loss}: {result.step} steps in {took:.0f} s; the run's held-out evaluation: "
              f"{json.dumps({k: round(v, 4) for k, v in result.report.items() if isinstance(v, float)})}")  # fmt: skip
        report(loss, tuned, tokenizer, held)
        del tuned


if __name__ == "__main__":
    main()

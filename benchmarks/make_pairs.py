"""Preference pairs whose chosen answer is right and rejected answer wrong, generated (nothing downloaded).

Two kinds, alternating: arithmetic (``Q: What is 37 + 48?`` -> the right sum against one off by 1-9) and
formatting (``Q: Name three fruits.`` -> a numbered list, one item per line, against the same items run together
on one line). Rows are TRL's standard layout ``{"prompt", "chosen", "rejected", "kind"}``; the same seed gives the
same rows.

    .venv/bin/python benchmarks/make_pairs.py --rows 240 --output pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POOLS = {
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "animals": ["cat", "dog", "horse", "lion", "tiger", "rabbit", "mouse", "eagle", "shark", "bear"],
    "countries": ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico", "Spain"],
    "vegetables": ["carrot", "potato", "onion", "pepper", "cabbage", "spinach", "pea", "leek", "radish", "corn"],
    "instruments": ["piano", "violin", "guitar", "flute", "drum", "cello", "trumpet", "harp", "oboe", "banjo"],
}
COUNTS = {3: "three", 4: "four"}


def pair(rng: random.Random, index: int) -> dict[str, str]:
    """One generated pair: arithmetic on even indices, formatting on odd ones."""
    if index % 2 == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 9)
        return {"prompt": f"Q: What is {a} + {b}?\nA:", "chosen": f" {a + b}", "rejected": f" {wrong}",
                "kind": "arithmetic"}  # fmt: skip
    topic = rng.choice(sorted(POOLS))
    n = rng.choice(sorted(COUNTS))
    items = rng.sample(POOLS[topic], n)
    numbered = "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    prompt = f"Q: Name {COUNTS[n]} {topic}.\nA:"
    return {"prompt": prompt, "chosen": f"\n{numbered}", "rejected": " " + ", ".join(items), "kind": "formatting"}


def make_pairs(rows: int, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` pairs (see the module docstring), no two with the same prompt and answers."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < rows:
        row = pair(rng, len(out))
        key = (row["prompt"], row["chosen"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    rows = make_pairs(args.rows, args.seed)
    Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {args.output}")


if __name__ == "__main__":
    main()

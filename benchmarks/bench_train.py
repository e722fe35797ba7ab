"""QLoRA classification training on CPU: nibble vs transformers + PEFT + bitsandbytes, in one run.

Both stacks train the same NF4-quantized model (a random Qwen3 built here, or ``--model-dir``) on the
same batches with the same LoRA rank/targets, the same initial adapter and head (nibble writes its
initial adapter in PEFT's layout and PEFT loads it), and the same AdamW settings, in fp32.

Speed: the stacks live in one process and take turns, one training step each, so a machine shared
with other work slows them alike; tokens/s is the median over steps (after 2 warm-up steps) and the
ratio is the median of the per-step ratios. Memory: each stack also runs a few steps alone in a fresh
process, whose peak RSS is reported. The final loss (mean of the last 5 steps) shows the stacks train
the same thing.

    .venv/bin/python benchmarks/bench_train.py                 # ~1-2 minutes on a 2-core CPU
    .venv/bin/python benchmarks/bench_train.py --model-dir ~/models/SmolLM2-135M --steps 8

``--nproc N`` measures data-parallel scaling instead: the real ``nibble train`` (LoRA, the same global batch)
on one process with N threads (the reference) and under ``torchrun`` on N ranks of one thread each (gloo);
with ``--device cuda``, one GPU against N GPUs, with each run's peak device memory. tokens/s is the median
over log windows after the warm-up, read from rank 0's metrics.jsonl (it counts every rank's tokens); the two
set-ups alternate ``--repeats`` times and each keeps its best run (on a shared machine, the least disturbed).

    .venv/bin/python benchmarks/bench_train.py --nproc 2       # ~1 minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WARMUP = 2
STACKS = ("nibble", "nibble-nocache", "hf")
NAMES = {
    "nibble": "nibble (4-bit cache on)",
    "nibble-nocache": "nibble (cache off)",
    "hf": "transformers+PEFT+bnb",
}


def build_model(path: Path, args: argparse.Namespace) -> int:
    """Save a random Qwen3 (fp32) to ``path``; returns its pad id."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64,
        pad_token_id=args.vocab - 1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return args.vocab - 1


def make_batches(args: argparse.Namespace, vocab: int, pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batches of random tokens; a row's label is which of K marker tokens it contains."""
    gen = torch.Generator().manual_seed(1)
    n = WARMUP + args.steps
    ids = torch.full((n, args.batch, args.seq), pad, dtype=torch.long)
    mask = torch.zeros(n, args.batch, args.seq, dtype=torch.long)
    labels = torch.randint(0, args.labels, (n, args.batch), generator=gen)
    for s in range(n):
        for b in range(args.batch):
            length = int(torch.randint(args.seq // 2, args.seq + 1, (1,), generator=gen))
            row = torch.randint(args.labels, vocab - 1, (length,), generator=gen)
            row[torch.randint(0, length, (3,), generator=gen)] = labels[s, b]
            ids[s, b, :length] = row
            mask[s, b, :length] = 1
    return {"ids": ids, "mask": mask, "labels": labels}


def load_stack(stack: str, args: argparse.Namespace, work: Path):
    """``(forward(ids, mask) -> logits, trainable params, note)`` for one stack."""
    torch.manual_seed(0)
    if stack == "hf":
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForSequenceClassification.from_pretrained(
            work / "base", num_labels=args.labels, quantization_config=quant, device_map="cpu", dtype=torch.float32
        )
        model = PeftModel.from_pretrained(base, work / "init", is_trainable=True).train()
        params = [p for p in model.parameters() if p.requires_grad]
        return (lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits), params, "bitsandbytes Linear4bit"

    from nibble.io.peft import adapter_config, save_adapter
    from nibble.model import load_model
    from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
    from nibble.train.config import TrainConfig
    from nibble.train.run import prepare_model

    model = load_model(work / "base", task="classify", num_labels=args.labels, quantize="nf4")
    config = TrainConfig(lora_rank=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, lora_targets=args.targets)
    prepare_model(model, config)
    budget = 0 if stack == "nibble-nocache" else cache_budget_bytes(None)
    cached, total, used = cache_dense_weights(model, budget, torch.float32)
    if not (work / "init").exists():
        peft = adapter_config(
            base_model=str(work / "base"),
            targets=args.targets.split(","),
            rank=args.rank,
            alpha=2 * args.rank,
            dropout=0.0,
            use_rslora=False,
            task="classify",
        )
        save_adapter(model, work / "init", peft)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), params, f"{cached}/{total} projections cached ({used / 2**20:.0f} MiB)"


def step(forward, params, opt, batches, s: int) -> tuple[float, float]:
    """One AdamW step on batch ``s``; returns ``(loss, tokens/s)``."""
    start = time.perf_counter()
    ids, mask = batches["ids"][s], batches["mask"][s]
    t = int(mask.sum(1).max())
    loss = F.cross_entropy(forward(ids[:, :t], mask[:, :t]).float(), batches["labels"][s])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), int(mask.sum()) / (time.perf_counter() - start)


def run_memory_child(args: argparse.Namespace) -> None:
    """A few steps of one stack alone in this process; prints its peak RSS."""
    work = Path(args.work)
    from safetensors.torch import load_file

    forward, params, _ = load_stack(args.side, args, work)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    batches = load_file(str(work / "batches.safetensors"))
    for s in range(WARMUP + 1):
        step(forward, params, opt, batches, s)
    print("RSS_MB", peak_rss_self_mb())


def peak_rss_self_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec, unlike ru_maxrss, which a child inherits)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(stack: str, args: argparse.Namespace, work: Path) -> float:
    argv = [sys.executable, __file__, "--side", stack, "--work", str(work)]
    for key in ("labels", "rank", "lr", "targets", "threads"):
        argv += [f"--{key}", str(getattr(args, key))]
    proc = subprocess.run(argv, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RSS_MB ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{stack} failed:\n{proc.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def scaling_model(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A random Qwen3 (byte-level tokenizer) and rows of random words with 4 labels: ``(model dir, data file)``."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import helpers

    model = helpers.make_hf_model(
        "qwen3",
        num_labels=None,
        init_std=None,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64,
    )
    base = helpers.save_hf_model(model, work / "base")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    rows = []
    for _ in range(args.batch * (WARMUP + args.steps)):
        label = rng.randrange(4)
        text = " ".join(rng.choice(words[2 * label : 2 * label + 2] + words) for _ in range(rng.randint(4, 24)))
        rows.append({"text": text, "label": f"class{label}"})
    return base, helpers.write_jsonl(work / "train.jsonl", rows)


def scaling_run(args: argparse.Namespace, base: Path, data: Path, out: Path, nproc: int) -> dict:
    """One ``nibble train`` run on ``nproc`` processes (1: no torchrun); its tokens/s, wall time, final loss and
    peak device memory."""
    threads = args.nproc if nproc == 1 else 1
    train = ["train", "--model", base, "--data", data, "--output", out, "--method", "lora", "--dtype", "float32"]
    train += ["--batch-size", args.batch // nproc, "--max-steps", WARMUP + args.steps, "--log-every", 1]
    train += ["--val-split", 0, "--save-every", 0, "--lora-rank", args.rank, "--lora-targets", args.targets]
    train += ["--lora-dropout", 0, "--lr", args.lr, "--device", args.device]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*(launch if nproc > 1 else [sys.executable]), "-m", "nibble", *map(str, train)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    return {
        "threads": threads,
        "rate": statistics.median(r["tokens_per_s"] for r in records[WARMUP:]),
        "wall": wall,
        "losses": [r["loss"] for r in records],
        "device_peak": records[-1].get("peak_device_bytes"),
    }


def scaling(args: argparse.Namespace) -> None:
    """``--nproc N``: print the table of one process against N ranks."""
    if args.batch % args.nproc:
        raise SystemExit(f"--batch {args.batch} must divide among --nproc {args.nproc} ranks")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, data = scaling_model(work, args)
        tries: dict[int, list[dict]] = {1: [], args.nproc: []}
        for r in range(args.repeats):
            for n in tries:
                tries[n].append(scaling_run(args, base, data, work / f"run{n}-{r}", n))
        runs = {n: max(found, key=lambda run: run["rate"]) for n, found in tries.items()}
    ref = runs[1]
    print(f"# bench_train --nproc {args.nproc}: LoRA classification, nibble train vs torchrun, {datetime.date.today()}")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
          f"torch {torch.__version__}; device {args.device}")  # fmt: skip
    print(f"# model: random Qwen3 hidden {args.hidden}, {args.layers} layers; global batch {args.batch} rows of "
          f"4-24 words, LoRA r={args.rank} on {args.targets}, {args.steps} timed steps, fp32; "
          f"best of {args.repeats} alternating runs each")  # fmt: skip
    print()
    print(
        "| processes | threads each | tokens/s | vs 1 process | wall s (with start-up) | device peak MiB | final loss |"
    )  # noqa: E501
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, run in runs.items():
        peak = "-" if run["device_peak"] is None else f"{run['device_peak'] / 2**20:.0f}"
        print(
            f"| {n} | {run['threads']} | {run['rate']:.0f} | {run['rate'] / ref['rate']:.2f}x | {run['wall']:.1f} | "
            f"{peak} | {run['losses'][-1]:.6f} |"
        )
    diff = max(abs(a - b) for a, b in zip(ref["losses"], runs[args.nproc]["losses"], strict=True))
    print(f"\nlargest per-step loss difference, {args.nproc} ranks vs 1 process: {diff:.2e}")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="a real checkpoint (e.g. SmolLM2-135M) instead of the random Qwen3")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for every stack (default 1: stable on a busy machine)"
    )
    parser.add_argument("--nproc", type=int, help="measure 1 process against N torchrun ranks instead (see above)")
    parser.add_argument("--repeats", type=int, default=2, help="--nproc runs: runs of each set-up (best kept)")
    parser.add_argument("--device", default="cpu", help="--nproc runs: cpu, or cuda (one GPU per rank)")
    parser.add_argument("--side", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.nproc:
        scaling(args)
        return
    if args.side:
        run_memory_child(args)
        return

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model_dir:
            (work / "base").symlink_to(Path(args.model_dir).resolve())
            config = json.loads((work / "base" / "config.json").read_text())
            vocab, pad = config["vocab_size"], config.get("pad_token_id") or config["eos_token_id"]
            what = args.model_dir
        else:
            pad = build_model(work / "base", args)
            vocab = args.vocab
            what = f"random Qwen3 hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}"
        batches = make_batches(args, vocab, pad)
        save_file(batches, str(work / "batches.safetensors"))
        stacks = {}
        for name in STACKS:  # nibble first: it writes the initial adapter the others start from
            start = time.perf_counter()
            forward, params, note = load_stack(name, args, work)
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
            stacks[name] = dict(forward=forward, params=params, opt=opt, note=note, losses=[], rates=[])
            stacks[name]["load_s"] = time.perf_counter() - start
        for s in range(WARMUP + args.steps):
            for st in stacks.values():
                loss, rate = step(st["forward"], st["params"], st["opt"], batches, s)
                st["losses"].append(loss)
                if s >= WARMUP:
                    st["rates"].append(rate)
        rss = {name: peak_rss(name, args, work) for name in STACKS}

    ref = stacks["hf"]
    print(f"# bench_train: QLoRA (NF4) sequence classification, CPU, {datetime.date.today()}")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}")  # fmt: skip
    print(f"# model: {what}; batch {args.batch} x <= {args.seq} tokens, LoRA r={args.rank} on {args.targets}, "
          f"{args.steps} timed steps, fp32")  # fmt: skip
    print()
    print("| stack | tokens/s | vs ref | peak RSS MiB | vs ref | final loss | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, st in stacks.items():
        ratio = statistics.median(a / b for a, b in zip(st["rates"], ref["rates"], strict=True))
        print(
            f"| {NAMES[name]} | {statistics.median(st['rates']):.0f} | {ratio:.2f}x | {rss[name]:.0f} | "
            f"{rss[name] / rss['hf']:.2f}x | {sum(st['losses'][-5:]) / 5:.4f} | {st['note']} |"
        )
    diff = max(abs(a - b) for a, b in zip(stacks["nibble"]["losses"], ref["losses"], strict=True))
    print(f"\nlargest per-step loss difference, nibble vs reference: {diff:.2e}")


if __name__ == "__main__":
    main()

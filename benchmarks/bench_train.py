"""End-to-end QLoRA training on CPU: ``nibble train`` against transformers + PEFT + bitsandbytes, in one run.

Classification: both stacks fine-tune the same real model (SmolLM2-135M-Instruct, from the demo's GGUF) as a
sequence classifier of the shipped support messages (``nibble/data/demo_classify.jsonl``; the last 20% held
out, as the demo does), with the same steps, batch size, max length, LoRA rank/alpha/targets/dropout,
learning rate and schedule. Each run is a fresh process timed from its start until the adapter is on disk:
nibble through its real CLI with its defaults; the reference as the recommended recipe (NF4 weights through
``BitsAndBytesConfig``, compute dtype = the run's dtype, autocast for bf16, dynamic padding, PEFT LoRA, a plain
AdamW loop) in a child of this script. The stacks alternate (A, B, A, B, ...) so load from other work on the
machine falls on both alike; the table gives the median of the repeats and each ratio is the median of the
paired ratios.

Instruction tuning: sequences of ~512 tokens (vocab 49k), the loss on the responses; training tokens/s and
peak RSS, nibble's CLI against the reference fed the very same batches (nibble's own tokenization).

Preference tuning (DPO, ``--loss sigmoid``, beta 0.1): pairs of ~250 tokens per sequence generated from the shipped
messages (a list of support messages; chosen: their topics in order, rejected: shuffled), QLoRA on both stacks:
``nibble train --task preference`` (the reference with the adapters off) against TRL's DPOTrainer on the PEFT +
bitsandbytes NF4 model (its reference likewise the adapter off), the same rows, steps, batch, LoRA and learning
rate; pairs/s (nibble: its per-step tokens/s over a mean pair's tokens; TRL: pairs per step time, both after the
first step), peak RSS, and the held-out preference accuracy (rewards/accuracies) after training.

Columns: wall = process start to adapter on disk; tokens/s = real (non-pad) training tokens per second of the
training loop (median of 10-step windows); peak RSS = the process's maximum resident set; accuracy on the
held-out rows.

    .venv/bin/python benchmarks/bench_train.py                      # both tables, 2 repeats (~40 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --dtypes float32 --repeats 1 --skip-instruct

``--nproc N`` measures data-parallel scaling instead: nibble's classification run (the same global batch,
``--batch-size``) on one process with N threads, the reference, against ``torchrun --nproc-per-node N`` with
one thread per rank (gloo); with ``--device cuda``, one GPU against N GPUs, with rank 0's peak device memory.
Columns as above (tokens/s counts every rank's tokens); the peak RSS is rank 0's, from its metrics.jsonl. With
``--shard-base``, a third set-up: the N ranks with ``--shard-base`` (FSDP2 over the 4-bit base, which keeps no
dense copies, so the DDP rows run with ``--cache-budget-mb 0`` too, for the same arithmetic).

    .venv/bin/python benchmarks/bench_train.py --nproc 2 --dtypes float32 --steps 12 --batch-size 8

``--baseline-src DIR`` adds the stack ``nibble-baseline``: the same CLI run from another source tree's ``src``
(e.g. ``git archive REV src | tar -x -C DIR``), alternating with the others, so a change is measured before and
after in one run; with ``--ref nibble-baseline`` the ratios are to it.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_train.py --baseline-src /tmp/before/src --stacks nibble \
        --ref nibble-baseline --dtypes float32 --repeats 2 --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STACKS = ("nibble", "nibble-nocache", "nibble-compile", "nibble-mmap", "hf")
NAMES = {
    "nibble": "nibble (defaults)",
    "nibble-baseline": "nibble (defaults), --baseline-src",
    "nibble-nocache": "nibble (--cache-budget-mb 0)",
    "nibble-compile": "nibble (--compile)",
    "nibble-mmap": "nibble (MALLOC_MMAP_THRESHOLD_=4 MiB)",
    "hf": "transformers+PEFT+bnb",
}
NIBBLE_FLAGS = {"nibble-nocache": ["--cache-budget-mb", "0"], "nibble-compile": ["--compile"]}
WINDOW = 10  # steps per throughput window


# ---------------------------------------------------------------------------------------------------------
# The reference: transformers + PEFT + bitsandbytes, the recommended QLoRA recipe, in a child process.


def _window_rates(tokens: list[int], seconds: list[float]) -> list[float]:
    return [
        sum(tokens[i : i + WINDOW]) / sum(seconds[i : i + WINDOW]) for i in range(0, len(tokens) - WINDOW + 1, WINDOW)
    ]


def _hf_model(args: argparse.Namespace, task: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    dtype = getattr(torch, args.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    # the layers left unquantized (embeddings, norms, head) in the run's dtype, as the QLoRA recipe loads them
    common = dict(quantization_config=quant, device_map="cpu", dtype=dtype)
    if task == "classify":
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=args.num_labels, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, **common)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _hf_optimizer(model, args: argparse.Namespace, steps: int):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * steps), steps)
    return params, opt, schedule


def _hf_step(model, params, opt, schedule, args, loss) -> None:
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)


def hf_classify(args: argparse.Namespace) -> dict:
    """Train, evaluate on the held-out rows, save the adapter; returns tokens/s and accuracy."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines() if line.strip()]
    held = [json.loads(line) for line in Path(args.val_data).read_text().splitlines() if line.strip()]
    labels = sorted({r["label"] for r in rows})
    args.num_labels = len(labels)
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_seq_len)["input_ids"]
    held_enc = tokenizer([r["text"] for r in held], truncation=True, max_length=args.max_seq_len)["input_ids"]
    targets = [labels.index(r["label"]) for r in rows]
    model = _hf_model(args, "classify")
    model.config.pad_token_id = tokenizer.pad_token_id
    params, opt, schedule = _hf_optimizer(model, args, args.steps)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def batch(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:  # dynamic padding, right side
        t = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), t), tokenizer.pad_token_id)
        mask = torch.zeros(len(ids), t, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
        return input_ids, mask

    rng = np.random.default_rng(42)
    order: list[int] = []
    tokens, seconds = [], []
    model.train()
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.permutation(len(enc)).tolist()
        chosen, order = order[: args.batch_size], order[args.batch_size :]
        start = time.perf_counter()
        input_ids, mask = batch([enc[i] for i in chosen])
        with autocast:
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([targets[i] for i in chosen]))
        _hf_step(model, params, opt, schedule, args, loss)
        tokens.append(int(mask.sum()))
        seconds.append(time.perf_counter() - start)
    model.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for s in range(0, len(held_enc), 2 * args.batch_size):
            input_ids, mask = batch(held_enc[s : s + 2 * args.batch_size])
            predicted = model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1).tolist()
            gold = [labels.index(r["label"]) for r in held[s : s + 2 * args.batch_size]]
            correct += sum(p == g for p, g in zip(predicted, gold, strict=True))
    model.save_pretrained(Path(args.output) / "adapter")
    return {"tokens_per_s": statistics.median(_window_rates(tokens, seconds)), "accuracy": correct / len(held)}


def hf_instruct(args: argparse.Namespace) -> dict:
    """Train on nibble's own instruction batches (same tokens, same labels); returns tokens/s."""
    import torch

    from nibble.data.batching import BatchStream
    from nibble.data.instruct import fit_length, read_instruct, use_chat_template
    from nibble.io.tokenizer import load_tokenizer

    torch.manual_seed(42)
    tokenizer = load_tokenizer(args.model)
    use_chat_template(tokenizer)
    data = fit_length(read_instruct(args.train, tokenizer), args.max_seq_len, False, args.train)
    stream = BatchStream(data, args.batch_size, tokenizer.pad_id, 42)
    model = _hf_model(args, "causal_lm")
    params, opt, schedule = _hf_optimizer(model, args, args.steps)
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    tokens, seconds = [], []
    model.train()
    for _ in range(args.steps):
        start = time.perf_counter()
        b = stream.next_batch()
        with autocast:  # transformers shifts the labels itself; -100 marks the prompt and the padding
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        _hf_step(model, params, opt, schedule, args, loss)
        tokens.append(int(b["attention_mask"].sum()))
        seconds.append(time.perf_counter() - start)
    model.save_pretrained(Path(args.output) / "adapter")
    return {"tokens_per_s": statistics.median(_window_rates(tokens, seconds))}


def step_clock(times: list[float]):
    """A transformers ``TrainerCallback`` that appends the seconds of each training step to ``times``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    return Clock()


def hf_preference(args: argparse.Namespace) -> dict:
    """DPO with TRL's DPOTrainer (PEFT LoRA on the bitsandbytes NF4 model, the adapter off as reference) on the
    same rows; returns pairs/s (median over the steps after the first) and the held-out preference accuracy."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(42)
    rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    held = [json.loads(line) for line in Path(args.val_data).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = _hf_model(args, "causal_lm")
    times: list[float] = []
    config = DPOConfig(
        output_dir=str(Path(args.output) / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * args.steps),
        weight_decay=0.01, beta=0.1,
        max_length=args.max_seq_len, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10**6,
        bf16=args.dtype == "bfloat16", per_device_eval_batch_size=2 * args.batch_size, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(held),
        processing_class=tokenizer,
        callbacks=[step_clock(times)],
    )
    trainer.train()
    accuracy = trainer.evaluate()["eval_rewards/accuracies"]
    model.save_pretrained(Path(args.output) / "adapter")
    return {"pairs_per_s": args.batch_size / statistics.median(times[1:]), "accuracy": accuracy}


# ---------------------------------------------------------------------------------------------------------
# The driver: data, commands, alternating timed runs, tables.


def run_timed(
    argv: list[str], env: dict[str, str] | None = None, keep_stderr: bool = False
) -> tuple[float, float, str]:
    """Run ``argv``; returns ``(wall seconds, peak RSS MiB of that process, stdout)`` (its stderr after the stdout
    with ``keep_stderr``)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{stderr[-4000:]}")
    return wall, usage.ru_maxrss / 1024, stdout + stderr if keep_stderr else stdout


def nibble_rates(out: Path) -> float:
    """Median tokens/s of nibble's logged training windows (metrics.jsonl)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records if r["kind"] == "train")


REVIEWS = Path(__file__).parent / "data" / "short_reviews.jsonl"


def split_data(source: str, work: Path) -> tuple[Path, Path]:
    """``(train.jsonl, heldout.jsonl)``: the last 20% of the set held out (both sets are ordered so that it is
    balanced over the classes)."""
    if source == "demo":
        from nibble.cli.demo import split_demo_data

        train, held_out, _, _ = split_demo_data(work / "data")
        return train, held_out
    lines = REVIEWS.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = len(lines) - round(0.2 * len(lines))
    (work / "data").mkdir(parents=True, exist_ok=True)
    train, held_out = work / "data" / "train.jsonl", work / "data" / "heldout.jsonl"
    train.write_text("".join(lines[:cut]), encoding="utf-8")
    held_out.write_text("".join(lines[cut:]), encoding="utf-8")
    return train, held_out


def write_instruct_data(path: Path, rows: int) -> None:
    """Conversations of ~500 tokens from the shipped messages: label a list of messages, one topic per line."""
    from importlib import resources

    lines = resources.files("nibble.data").joinpath("demo_classify.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    out = []
    for r in range(rows):
        picked = [records[(r * 23 + i * 7) % len(records)] for i in range(24)]
        prompt = "Give the topic of each support message, one per line.\n" + "\n".join(
            f"{i + 1}. {p['text']}" for i, p in enumerate(picked)
        )
        answer = "\n".join(f"{i + 1}. {p['label']}" for i, p in enumerate(picked))
        out.append(json.dumps({"instruction": prompt, "response": answer}))
    path.write_text("\n".join(out) + "\n")


def write_preference_data(path: Path, rows: int, seed: int = 0) -> None:
    """Pairs of ~256 tokens from the shipped messages: a prompt listing support messages, the chosen answer their
    topics in order, the rejected one the same topics shuffled."""
    import random
    from importlib import resources

    lines = resources.files("nibble.data").joinpath("demo_classify.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rng, out = random.Random(seed), []
    while len(out) < rows:
        picked = rng.sample(records, 9)
        prompt = "Give the topic of each support message, one per line.\n" + "\n".join(
            f"{i + 1}. {p['text']}" for i, p in enumerate(picked)
        )
        labels = [p["label"] for p in picked]
        wrong = labels[:]
        rng.shuffle(wrong)
        if wrong == labels:
            continue
        answer = lambda ls: "\n" + "\n".join(f"{i + 1}. {label}" for i, label in enumerate(ls))  # noqa: E731
        out.append(json.dumps({"prompt": prompt + "\nTopics:", "chosen": answer(labels), "rejected": answer(wrong)}))
    path.write_text("\n".join(out) + "\n")


def preference_commands(stack: str, args: argparse.Namespace, dtype: str, data: tuple[Path, Path], out: Path):
    if stack == "hf":
        argv = [sys.executable, __file__, "--child", "preference", "--model", str(args.model), "--train", str(data[0])]
        argv += ["--val-data", str(data[1]), "--output", str(out), "--dtype", dtype, "--dropout", "0.05"]
    else:
        argv = [sys.executable, "-m", "nibble", "train", "--task", "preference", "--model", str(args.model)]
        argv += ["--data", str(data[0]), "--val-data", str(data[1]), "--output", str(out), "--overwrite"]
        argv += ["--dtype", dtype, "--eval-every", "0", "--save-every", "0", "--log-every", "1"]
        argv += NIBBLE_FLAGS.get(stack, [])
    argv += ["--max-steps", str(args.preference_steps), "--batch-size", str(args.preference_batch)]
    argv += ["--max-seq-len", str(args.preference_seq_len), "--lora-rank", str(args.rank)]
    argv += ["--lora-alpha", str(2 * args.rank), "--lora-targets", args.targets, "--lr", str(args.lr)]
    return argv


def mean_pair_tokens(path: Path, model: Path, max_seq_len: int) -> float:
    """Tokens of a pair's two sequences, on average over ``path`` (as nibble and TRL tokenize them)."""
    from nibble.data.preference import Truncation, load_pairs
    from nibble.io.tokenizer import load_tokenizer

    return float(load_pairs(path, load_tokenizer(model), Truncation(max_seq_len)).lengths().mean())


def preference_table(results: dict) -> list[str]:
    """Pairs/s, peak RSS and held-out preference accuracy (medians), with nibble's ratios to TRL."""
    med = {s: {k: statistics.median(r[k] for r in runs) for k in ("pairs_per_s", "rss", "accuracy")}
           for s, runs in results.items()}  # fmt: skip
    rows = [
        "| stack | pairs/s | peak RSS MiB | held-out accuracy | pairs/s vs TRL | RSS vs TRL |",
        "|---|---|---|---|---|---|",
    ]
    for stack, m in med.items():
        name = "TRL DPOTrainer+PEFT+bnb" if stack == "hf" else NAMES[stack]
        ratios = f"{m['pairs_per_s'] / med['hf']['pairs_per_s']:.2f}x | {m['rss'] / med['hf']['rss']:.2f}x"
        rows.append(f"| {name} | {m['pairs_per_s']:.3f} | {m['rss']:.0f} | {m['accuracy']:.3f} | {ratios} |")
    return rows


def classify_commands(stack: str, args: argparse.Namespace, dtype: str, data: tuple[Path, Path], out: Path):
    common = dict(steps=args.steps, batch=args.batch_size, seq=args.max_seq_len, rank=args.rank, lr=args.lr)
    if stack == "hf":
        argv = [sys.executable, __file__, "--child", "classify", "--model", str(args.model), "--train", str(data[0])]
        argv += ["--val-data", str(data[1]), "--output", str(out), "--dtype", dtype]
        if args.dropout is not None:
            argv += ["--dropout", str(args.dropout)]
    else:
        argv = [sys.executable, "-m", "nibble", "train", "--model", str(args.model), "--data", str(data[0])]
        argv += ["--val-data", str(data[1]), "--output", str(out), "--overwrite", "--dtype", dtype]
        if args.dropout is not None:
            argv += ["--lora-dropout", str(args.dropout)]
        argv += NIBBLE_FLAGS.get(stack, [])
    argv += ["--max-steps", str(common["steps"]), "--batch-size", str(common["batch"])]
    argv += ["--max-seq-len", str(common["seq"]), "--lora-rank", str(common["rank"])]
    argv += ["--lora-alpha", str(2 * args.rank), "--lora-targets", args.targets, "--lr", str(common["lr"])]
    return argv


def instruct_commands(stack: str, args: argparse.Namespace, dtype: str, data: Path, out: Path):
    if stack == "hf":
        argv = [sys.executable, __file__, "--child", "instruct", "--model", str(args.model), "--train", str(data)]
        argv += ["--output", str(out), "--dtype", dtype]
        if args.dropout is not None:
            argv += ["--dropout", str(args.dropout)]
    else:
        argv = [sys.executable, "-m", "nibble", "train", "--task", "instruct", "--model", str(args.model)]
        argv += ["--data", str(data), "--output", str(out), "--overwrite", "--dtype", dtype, "--val-split", "0"]
        argv += ["--eval-every", "0", "--save-every", "0"]
        if args.dropout is not None:
            argv += ["--lora-dropout", str(args.dropout)]
        argv += NIBBLE_FLAGS.get(stack, [])
    argv += ["--max-steps", str(args.instruct_steps), "--batch-size", str(args.instruct_batch)]
    argv += ["--max-seq-len", "512", "--lora-rank", str(args.rank), "--lora-alpha", str(2 * args.rank)]
    argv += ["--lora-targets", args.targets, "--lr", str(args.lr)]
    return argv


def child_result(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines()[::-1] if line.startswith("{")))


def measure(kind: str, args: argparse.Namespace, dtype: str, data, work: Path, stacks: tuple[str, ...]) -> dict:
    """``{stack: [run, ...]}`` with each run's wall, RSS, tokens/s (and accuracy), the stacks alternating."""
    results: dict[str, list[dict]] = {s: [] for s in stacks}
    for repeat in range(args.repeats):
        for stack in stacks if repeat % 2 == 0 else stacks[::-1]:
            out = work / f"{kind}-{dtype}-{stack}-{repeat}"
            make = {"classify": classify_commands, "instruct": instruct_commands}.get(kind, preference_commands)
            env = thread_env(args.threads)
            if stack == "nibble-baseline":
                env["PYTHONPATH"] = str(args.baseline_src)
            if stack == "nibble-compile":  # an empty kernel cache: the compile time of a first run
                env["TORCHINDUCTOR_CACHE_DIR"] = str(out.with_name(out.name + "-kernels"))
            if stack == "nibble-mmap":  # glibc maps blocks of 4 MiB and more on their own (README: memory)
                env["MALLOC_MMAP_THRESHOLD_"] = str(4 << 20)
            wall, rss, stdout = run_timed(make(stack, args, dtype, data, out), env)
            run = {"wall": wall, "rss": rss}
            if stack == "hf":
                run.update(child_result(stdout))
            else:
                run["tokens_per_s"] = nibble_rates(out)
                if kind == "preference":  # per-step tokens/s (after the first step) over a mean pair's tokens
                    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
                    run["pairs_per_s"] = statistics.median(rates) / args.pair_tokens
                if kind in ("classify", "preference"):
                    run["accuracy"] = json.loads((out / "eval_report.json").read_text())["accuracy"]
                run["note"] = next((line for line in stdout.splitlines() if line.startswith("cache:")), "")
            results[stack].append(run)
            print(f"  {kind} {dtype} {stack} #{repeat}: " + json.dumps(run), flush=True)
    return results


def table(results: dict, ref: str = "hf", accuracy: bool = True) -> list[str]:
    head = "| stack | wall s | vs ref | tokens/s | vs ref | peak RSS MiB | vs ref |"
    head += " accuracy |" if accuracy else ""
    rows = [head, "|---|" + "---:|" * (6 + accuracy)]
    for stack, runs in results.items():

        def med(key: str, runs=runs) -> float:
            return statistics.median(r[key] for r in runs)

        def ratio(key: str, runs=runs, invert: bool = False) -> float:
            pairs = [(r[key], b[key]) for r, b in zip(runs, results[ref], strict=True)]
            return statistics.median(b / a if invert else a / b for a, b in pairs)

        spread = f" ({min(r['wall'] for r in runs):.0f}-{max(r['wall'] for r in runs):.0f})" if len(runs) > 1 else ""
        line = (
            f"| {NAMES[stack]} | {med('wall'):.0f}{spread} | {ratio('wall', invert=True):.2f}x faster | "
            f"{med('tokens_per_s'):.0f} | {ratio('tokens_per_s'):.2f}x | {med('rss'):.0f} | {ratio('rss'):.2f}x |"
        )
        if accuracy:
            line += f" {med('accuracy'):.3f} |"
        rows.append(line)
    return rows


def scaling(args: argparse.Namespace, dtype: str, work: Path) -> list[str]:
    """``--nproc N``: the table of nibble's classification run on 1 process against N torchrun ranks."""
    if args.batch_size % args.nproc:
        raise SystemExit(f"--batch-size {args.batch_size} must divide among --nproc {args.nproc} ranks")
    data = split_data(args.data, work)
    setups = [(1, "one process"), (args.nproc, "DDP")] + [(args.nproc, "--shard-base")] * args.shard_base
    runs: dict[tuple[int, str], list[dict]] = {setup: [] for setup in setups}
    for repeat in range(args.repeats):
        for n, engine in setups if repeat % 2 == 0 else setups[::-1]:
            out = work / f"nproc{n}-{engine.strip('-')}-{dtype}-{repeat}"
            argv = classify_commands("nibble", args, dtype, data, out) + ["--device", args.device]
            argv[argv.index("--batch-size") + 1] = str(args.batch_size // n)
            if args.shard_base:
                argv += ["--cache-budget-mb", "0"] + ["--shard-base"] * (engine == "--shard-base")
            if n > 1:  # argv: python -m nibble train ...
                argv[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            threads = args.nproc if n == 1 and args.device == "cpu" else 1
            wall, _, _ = run_timed(argv, {**os.environ, "OMP_NUM_THREADS": str(threads)})
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in records if r["kind"] == "train"][-1]
            report = json.loads((out / "eval_report.json").read_text())
            run = {"wall": wall, "tokens_per_s": nibble_rates(out), "threads": threads, "loss": last["loss"]}
            run.update(rss=last["peak_rss_bytes"] / 2**20, device=last.get("peak_device_bytes"))
            run["accuracy"] = report["accuracy"]
            runs[n, engine].append(run)
            print(f"  nproc {n} {engine} {dtype} #{repeat}: " + json.dumps(run), flush=True)
    rows = [
        "| processes | engine | threads each | wall s | tokens/s | vs 1 process | rank 0 peak RSS MiB "
        "| device peak MiB | last train loss | accuracy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (n, engine), found in runs.items():
        pairs = zip(found, runs[setups[0]], strict=True)
        ratio = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
        device = found[0]["device"]
        rows.append(
            f"| {n} | {engine} | {found[0]['threads']} | {statistics.median(r['wall'] for r in found):.0f} | "
            f"{statistics.median(r['tokens_per_s'] for r in found):.0f} | {ratio:.2f}x | "
            f"{statistics.median(r['rss'] for r in found):.0f} | "
            f"{'-' if device is None else f'{device / 2**20:.0f}'} | {found[0]['loss']:.6f} | "
            f"{found[0]['accuracy']:.3f} |"
        )
    return rows


def cpu_name() -> str:
    """The CPU's model name and the flags that decide bf16 speed (AVX2, AVX-512, AVX512-BF16, AMX)."""
    from nibble.devices import cpu_flags

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16") if f in cpu_flags(text)]
    return f"{name or platform.machine()} (flags: {' '.join(flags) or 'none of avx2/avx512/bf16'})"


def thread_env(threads: int | None) -> dict[str, str]:
    """The environment of a timed run: ``OMP_NUM_THREADS=threads``, or the machine's default when None."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return env if threads is None else {**env, "OMP_NUM_THREADS": str(threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or .gguf (default: the demo's SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--data",
        choices=("reviews", "demo"),
        default="reviews",
        help="reviews: benchmarks/data/short_reviews.jsonl (1,150 rows, 3 classes); demo: the demo's 350 messages",
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=2, help="runs per stack, alternating (default 2)")
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--dropout", type=float, default=None, help="LoRA dropout for both (default: each stack's own default)"
    )
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--baseline-src", type=Path, help="also run nibble from this src directory (see above)")
    parser.add_argument("--ref", default="hf", help="the stack the ratios are to (default hf)")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS of every run (default: the machine's, all cores, as a user runs it; on a machine shared "
        "with other work 1 is steadier: 2 threads on 2 busy cores made a 10-step run 5x slower, for both stacks)",
    )
    parser.add_argument("--nproc", type=int, help="measure 1 process against N torchrun ranks instead (see above)")
    parser.add_argument("--device", default="cpu", help="--nproc runs: cpu, or cuda (one GPU per rank)")
    parser.add_argument("--shard-base", action="store_true", help="--nproc runs: also the N ranks with --shard-base")
    parser.add_argument("--skip-classify", action="store_true")
    parser.add_argument("--skip-instruct", action="store_true")
    parser.add_argument("--instruct-steps", type=int, default=20)
    parser.add_argument("--instruct-batch", type=int, default=4)
    parser.add_argument("--skip-preference", action="store_true")
    parser.add_argument("--preference-steps", type=int, default=12)
    parser.add_argument("--preference-batch", type=int, default=4)
    parser.add_argument("--preference-seq-len", type=int, default=512)
    parser.add_argument("--child", choices=("classify", "instruct", "preference"), help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--val-data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", dest="child_steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lora-rank", dest="child_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lora-alpha", dest="alpha", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--lora-targets", dest="child_targets", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.steps, args.rank, args.targets = args.child_steps, args.child_rank, args.child_targets
        if args.dropout is None:
            args.dropout = 0.0  # PEFT's default
        result = {"classify": hf_classify, "instruct": hf_instruct, "preference": hf_preference}[args.child](args)
        print(json.dumps(result), flush=True)
        return

    from nibble.io.fetch import fetch_smollm2
    from nibble.model.loading import resolve_model_dir

    args.model = resolve_model_dir(args.model or fetch_smollm2())
    stacks = tuple(args.stacks.split(",")) + (("nibble-baseline",) if args.baseline_src else ())
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for dtype in args.dtypes.split(","):
            if args.nproc:
                tables.append((f"classification, {dtype}, 1 process vs {args.nproc} ranks", scaling(args, dtype, work)))
                continue
            if not args.skip_classify:
                results = measure("classify", args, dtype, split_data(args.data, work), work, stacks)
                tables.append((f"classification, {dtype}", table(results, args.ref)))
            if not args.skip_instruct:
                data = work / "instruct.jsonl"
                write_instruct_data(data, 8 * args.instruct_batch)
                lm_stacks = tuple(s for s in stacks if s != "nibble-nocache")
                results = measure("instruct", args, dtype, data, work, lm_stacks)
                tables.append((f"instruction tuning, {dtype}", table(results, args.ref, accuracy=False)))
            if not args.skip_preference:
                pairs = (work / "pairs.jsonl", work / "pairs-heldout.jsonl")
                write_preference_data(pairs[0], args.preference_batch * args.preference_steps)
                write_preference_data(pairs[1], 32, seed=1)
                args.pair_tokens = mean_pair_tokens(pairs[0], args.model, args.preference_seq_len)
                results = measure("preference", args, dtype, pairs, work, ("nibble", "hf"))
                tables.append((f"DPO, {dtype}, pairs of {args.pair_tokens:.0f} tokens", preference_table(results)))

    import torch

    threads = (
        "threads as in the table"
        if args.nproc
        else f"{args.threads or f'the default {torch.get_num_threads()}'} thread(s) per run"
    )
    print(f"\n# bench_train, {datetime.date.today()}: {cpu_name()}, {os.cpu_count()} CPUs, {threads}, "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print(f"# model {args.model.name}; classification: {args.steps} steps x batch {args.batch_size}, max-seq-len "
          f"{args.max_seq_len}, LoRA r {args.rank} alpha {2 * args.rank} on {args.targets}, lr {args.lr}, dropout "
          f"{'each default' if args.dropout is None else args.dropout}; {args.repeats} repeats")  # fmt: skip
    for title, rows in tables:
        print(f"\n## {title}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()

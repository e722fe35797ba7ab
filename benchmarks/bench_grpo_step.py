"""GRPO end to end: ``nibble train --task grpo`` against TRL's GRPOTrainer + PEFT + bitsandbytes (no vLLM), in one run.

Both train SmolLM2-135M-Instruct (the demo's GGUF, converted for TRL) with QLoRA (NF4, LoRA r 16 alpha 32 on
q_proj,v_proj) on the same generated prompts (``check_grpo.make_prompts``: sums as chat messages, the answer in a
column) with the same reward (1 when the completion's last number is the sum: nibble's built-in ``exact``, a
Python function for TRL), the same G, completions per step, completion length, temperature 1, learning rate,
``loss_type`` dapo and beta 0 (TRL's defaults). Each run is a fresh process, the two alternating; the table gives
the median whole-process wall time, the steps per second of the training loop (TRL: its step times after the
first; nibble: from its first step's progress line to its last's), the peak RSS, and the ratios.

    .venv/bin/python benchmarks/bench_grpo_step.py                  # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import cpu_name, run_timed, step_clock  # noqa: E402
from check_grpo import make_prompts  # noqa: E402

LAST_NUMBER = r"[-+]?\d+"


def trl_child(args: argparse.Namespace) -> None:
    """TRL's GRPOTrainer on the bitsandbytes NF4 model with a PEFT adapter; prints its step times as JSON."""
    import re

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def right_sum(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        found = [re.findall(LAST_NUMBER, t) for t in texts]
        return [float(bool(f) and f[-1] == a) for f, a in zip(found, answer, strict=True)]

    times: list[float] = []
    config = GRPOConfig(
        output_dir=str(Path(args.output) / "trl"), per_device_train_batch_size=args.batch_size,
        num_generations=args.generations, max_completion_length=args.max_completion_len, max_steps=args.steps,
        learning_rate=args.lr, temperature=1.0, beta=0.0, loss_type="dapo", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=right_sum,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[step_clock(times)],
    )
    trainer.train()
    trainer.model.save_pretrained(Path(args.output) / "adapter")
    print(json.dumps({"steps_per_s": 1 / statistics.median(times[1:])}))


def nibble_command(args: argparse.Namespace, gguf: Path, data: Path, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "nibble", "train", "--task", "grpo", "--model", str(gguf), "--data", str(data)]
    argv += ["--output", str(out), "--overwrite", "--val-split", "0", "--eval-every", "0", "--save-every", "0"]
    argv += ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    argv += ["--num-generations", str(args.generations), "--max-completion-len", str(args.max_completion_len)]
    argv += ["--max-seq-len", "128", "--rewards", "exact", "--loss-type", "dapo", "--beta", "0", "--dtype", "float32"]
    argv += ["--lora-rank", "16", "--lora-alpha", "32", "--lora-targets", "q_proj,v_proj", "--lora-dropout", "0"]
    return argv + ["--log-every", "1", "--warmup-ratio", "0"]


def nibble_steps_per_s(output: str) -> float:
    """Steps per second of nibble's loop, from its progress lines (``step N/M ... elapsed h:mm:ss``, one a step
    with ``--log-every 1``): from the first step's line to the last's, so the first step is left out."""
    import re

    found = [(int(n), seconds(t)) for n, t in re.findall(r"^step (\d+)/\d+ .*elapsed (\d+:\d\d:\d\d)", output, re.M)]
    (first, start), (last, end) = found[0], found[-1]
    return (last - first) / max(end - start, 1)


def seconds(clock: str) -> int:
    hours, minutes, secs = map(int, clock.split(":"))
    return 3600 * hours + 60 * minutes + secs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-completion-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        trl_child(args)
        return
    from nibble.io.fetch import fetch_smollm2
    from nibble.model.loading import resolve_model_dir

    gguf = Path(fetch_smollm2())
    converted = resolve_model_dir(gguf)
    results: dict[str, list[dict]] = {"nibble": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(64)))
        for repeat in range(args.repeats):
            for stack in ("nibble", "trl") if repeat % 2 == 0 else ("trl", "nibble"):
                out = work / f"{stack}-{repeat}"
                if stack == "nibble":
                    wall, rss, output = run_timed(nibble_command(args, gguf, data, out), keep_stderr=True)
                    rate = nibble_steps_per_s(output)
                else:
                    argv = [sys.executable, __file__, "--child", "--model", str(converted), "--data", str(data)]
                    argv += ["--output", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
                    argv += ["--generations", str(args.generations), "--lr", str(args.lr)]
                    argv += ["--max-completion-len", str(args.max_completion_len)]
                    wall, rss, stdout = run_timed(argv)
                    rate = json.loads(stdout.strip().splitlines()[-1])["steps_per_s"]
                results[stack].append({"wall": wall, "rss": rss, "steps_per_s": rate})
                print(f"  {stack} #{repeat}: {json.dumps(results[stack][-1])}", flush=True)
    print(f"\n# bench_grpo_step: {cpu_name()}; {args.steps} steps x {args.batch_size} completions (G = "
          f"{args.generations}, <= {args.max_completion_len} tokens), {args.repeats} repeats\n")  # fmt: skip
    print("| stack | wall s | steps/s | vs TRL | peak RSS MiB | vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = {k: statistics.median(r[k] for r in results["trl"]) for k in ("wall", "rss", "steps_per_s")}
    for stack, name in (("nibble", "nibble train --task grpo"), ("trl", "TRL GRPOTrainer + PEFT + bnb")):
        m = {k: statistics.median(r[k] for r in results[stack]) for k in ("wall", "rss", "steps_per_s")}
        print(f"| {name} | {m['wall']:.0f} | {m['steps_per_s']:.3f} | {m['steps_per_s'] / ref['steps_per_s']:.2f}x | "
              f"{m['rss']:.0f} | {m['rss'] / ref['rss']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Qwen3.5 on CPU: the gated delta rule alone, and QLoRA training of a small Qwen3.5-shaped model, against
transformers' torch path in the same run.

1. ``delta rule``: forward + backward of ``nibble.nn.delta_rule.chunk_gated_delta_rule`` (hand-written backward)
   vs transformers' ``torch_chunk_gated_delta_rule`` (autograd through its chunk loop) on the same fp32 inputs,
   Qwen3.5's real head layout (16 key heads, 32 value heads, 128 channels each), batch 1; the bytes autograd
   keeps for the backward (counted with saved-tensor hooks) and the largest output / gradient difference.
2. ``training``: a random Qwen3.5-shaped checkpoint (bf16 on disk; the sizes below), QLoRA (NF4 base, LoRA r=16
   on in_proj_qkv, in_proj_z, out_proj, q/k/v/o and the MLP) with AdamW on random tokens, causal-LM loss over
   every token: nibble vs transformers + PEFT + bitsandbytes (its torch fallback for the delta rule and the
   conv), each in its own process so its peak RSS is its own; tokens/s over the steps after the first.

    .venv/bin/python benchmarks/bench_qwen35.py [--lengths 512,2048] [--threads 2] [--hidden 512] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from timing import best_of

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv", "in_proj_z",
           "out_proj"]  # fmt: skip


def delta_inputs(t: int, hk: int = 16, hv: int = 32, d: int = 128, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, t, hk, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, t, hk, d, generator=gen), dim=-1)
    v = torch.randn(1, t, hv, d, generator=gen)
    g = -torch.rand(1, t, hv, generator=gen) * 0.5
    beta = torch.rand(1, t, hv, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def delta_rule_row(t: int, repeats: int) -> dict:
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from nibble.nn.delta_rule import chunk_gated_delta_rule

    forms = {
        "nibble": lambda *x: chunk_gated_delta_rule(*x)[0],
        "transformers": lambda *x: torch_chunk_gated_delta_rule(*x)[0],
    }
    inputs = delta_inputs(t)
    grad_out = torch.randn(1, t, 32, 128, generator=torch.Generator().manual_seed(1))
    row: dict = {"tokens": t}
    results = {}
    for name, fn in forms.items():

        def step(fn=fn):
            for x in inputs:
                x.grad = None
            fn(*inputs).backward(grad_out)

        row[f"{name} ms"] = best_of(step, repeats, warm_up=True) * 1e3
        saved: list[int] = []

        def keep(x: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            out = fn(*inputs)
        row[f"{name} saved MB"] = sum(saved) / 2**20
        for x in inputs:
            x.grad = None
        out.backward(grad_out)
        results[name] = [out.detach()] + [x.grad.clone() for x in inputs]
    row["speed-up"] = row["transformers ms"] / row["nibble ms"]
    row["max diff"] = max((a - b).abs().max().item() for a, b in zip(*results.values(), strict=True))
    return row


def write_checkpoint(directory: Path, hidden: int, layers: int) -> Path:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=8192, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=8,
        linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def train_worker(which: str, path: str, seq: int, steps: int, threads: int) -> None:
    """Run ``steps`` QLoRA steps with ``which`` (nibble or transformers) and print one JSON line."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if which == "nibble":
        import nibble
        from nibble.nn import apply_lora
        from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights

        model = nibble.load_model(path, quantize="nf4")
        cache_dense_weights(model, cache_budget_bytes(model, torch.float32, None), torch.float32)  # as nibble train
        apply_lora(model, TARGETS, rank=16, alpha=32)
        forward = lambda ids: model(ids)  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
        forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 8192, (1, seq), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = forward(ids)
        F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    tokens_s = seq * (steps - 1) / sum(times[1:])
    print(json.dumps({"tokens/s": tokens_s, "peak RSS MB": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would report the parent's peak too, as Linux keeps it across exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def train_row(path: Path, seq: int, steps: int, threads: int) -> dict:
    row: dict = {"tokens": seq}
    for which in ("nibble", "transformers"):
        argv = [sys.executable, __file__, "--worker", which, "--path", str(path), "--seq", str(seq)]
        argv += ["--steps", str(steps), "--threads", str(threads)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        for key, value in json.loads(out).items():
            row[f"{which} {key}"] = value
    row["speed-up"] = row["nibble tokens/s"] / row["transformers tokens/s"]
    row["memory ratio"] = row["nibble peak RSS MB"] / row["transformers peak RSS MB"]
    return row


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for row in rows:
        cells = [_cell(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


def _cell(value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,2048", help="delta-rule sequence lengths")
    parser.add_argument("--train-lengths", default="512", help="training sequence lengths")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", choices=("nibble", "transformers"))
    parser.add_argument("--path")
    parser.add_argument("--seq", type=int)
    args = parser.parse_args()
    if args.worker:
        train_worker(args.worker, args.path, args.seq, args.steps, args.threads)
        return
    torch.set_num_threads(args.threads)
    print(f"## delta rule, fp32, forward + backward, batch 1, 16 k-heads / 32 v-heads x 128, {args.threads} threads\n")
    print_table([delta_rule_row(int(t), args.repeats) for t in args.lengths.split(",")])
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "qwen35", args.hidden, args.layers)
        print(f"\n## QLoRA training, hidden {args.hidden}, {args.layers} layers (3 DeltaNet : 1 attention), fp32, "
              f"batch 1, {args.steps} steps\n")  # fmt: skip
        print_table([train_row(path, int(t), args.steps, args.threads) for t in args.train_lengths.split(",")])


if __name__ == "__main__":
    main()

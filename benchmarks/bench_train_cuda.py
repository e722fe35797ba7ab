"""QLoRA instruction tuning on one CUDA GPU: nibble vs transformers + PEFT + bitsandbytes, in one run.

A Qwen3-shaped model (the Qwen3-0.6B config by default, random weights built by transformers, saved in bf16) is
trained by both stacks on the same batches: NF4 frozen base (no double quantization), rank-16 LoRA on all seven
projections starting from the same initial adapter (nibble writes it in PEFT's layout and PEFT loads it), AdamW
with the same settings, bf16 compute, no gradient checkpointing, constant learning rate. Each row is a random
"prompt" followed by a random "response"; the loss covers the response tokens only (labels -100 elsewhere), as
instruction tuning does. nibble runs its own training step (``nibble.train.trainer.Trainer.step``: batches moved
through pinned memory, autocast, the fused Triton NF4 kernels, clipping, fused AdamW); the reference runs the
usual PEFT loop (``model(input_ids, attention_mask, labels).loss``).

Speed: tokens/s (real tokens, padding excluded) is the median over the timed steps after warm-up, each step
timed between two ``torch.cuda.synchronize()``. Memory: ``torch.cuda.max_memory_allocated`` from just before the
stack loads its model to the end of its last step, above what was allocated before. The stacks run one after the
other in one process; the first is gone (and the allocator's cache emptied) before the second loads. Targets:
nibble >= 2.5x the reference's tokens/s and <= 0.7x its peak memory.

    python benchmarks/bench_train_cuda.py                      # Qwen3-0.6B shape, 8 x 512 tokens, 20 timed steps
    python benchmarks/bench_train_cuda.py --layers 4 --steps 5 # a quick check of the script itself

Without a CUDA GPU it stops with one line.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

WARMUP = 3
# The Qwen3-0.6B config (hidden 1024, 28 layers, GQA 16/8 heads of 128, tied embeddings).
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(path: Path, layers: int) -> int:
    """Save a random Qwen3 with the 0.6B config (``layers`` blocks) in bf16 to ``path``; returns its pad id."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    pad = QWEN3_06B["vocab_size"] - 1
    config = Qwen3Config(**{**QWEN3_06B, "num_hidden_layers": layers}, pad_token_id=pad, eos_token_id=pad - 1)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init is much faster on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return pad


def make_data(args: argparse.Namespace, pad: int):
    """Instruction rows: a random prompt of 25-50% of the row, then the response; lengths from seq/2 to seq."""
    from nibble.data.instruct import IGNORE_INDEX, InstructData

    gen = torch.Generator().manual_seed(1)
    ids, labels = [], []
    for _ in range(args.batch * (WARMUP + args.steps)):
        length = int(torch.randint(args.seq // 2, args.seq + 1, (1,), generator=gen))
        row = torch.randint(0, pad - 1, (length,), generator=gen).tolist()
        prompt = int(torch.randint(length // 4, length // 2 + 1, (1,), generator=gen))
        ids.append(row)
        labels.append([IGNORE_INDEX] * prompt + row[prompt:])
    return InstructData.from_lists(ids, labels)


def run_nibble(args: argparse.Namespace, work: Path, data, pad: int) -> dict:
    """nibble's own QLoRA step; writes the initial adapter the reference starts from."""
    from nibble import kernels
    from nibble.data.batching import BatchStream
    from nibble.io.peft import adapter_config, save_adapter
    from nibble.model import load_model
    from nibble.nn import QuantLinear
    from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
    from nibble.train.config import TrainConfig
    from nibble.train.run import prepare_model
    from nibble.train.tasks import TaskRun
    from nibble.train.tasks.lm import lm_batch_loss, lm_forward
    from nibble.train.trainer import Trainer

    config = TrainConfig(
        method="qlora",
        device="cuda",
        dtype="bfloat16",
        lora_rank=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        lora_targets=",".join(TARGETS),
        lr=args.lr,
        weight_decay=0.01,
        max_grad_norm=1.0,
        batch_size=args.batch,
    )
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = load_model(work / "base", quantize="nf4", dtype=torch.bfloat16, device=device)
    prepare_model(model, config)
    copies = cache_dense_weights(model, cache_budget_bytes(model, torch.bfloat16), torch.bfloat16)
    peft_config = adapter_config(
        base_model=str(work / "base"),
        targets=list(TARGETS),
        rank=args.rank,
        alpha=2 * args.rank,
        dropout=0.0,
        use_rslora=False,
        task="causal_lm",
    )
    save_adapter(model, work / "init", peft_config)
    stream = BatchStream(data, args.batch, pad, seed=0)
    task = TaskRun(train=data, val=None, loss=lm_batch_loss, forward=lm_forward, summary="")
    run = work / "nibble-run"
    trainer = Trainer(model=model, stream=stream, config=config, out=run, total_steps=WARMUP + args.steps, task=task)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    note = f"{kernels.backend_name(layer.qweight.device)} kernels, {copies[0]}/{copies[1]} dense copies"

    def step() -> tuple[float, int]:
        loss, _, tokens, _ = trainer.step()
        return float(loss), tokens

    return {"step": step, "note": note}


def run_reference(args: argparse.Namespace, work: Path, data, pad: int) -> dict:
    """transformers + PEFT + bitsandbytes, the usual QLoRA loop, from nibble's initial adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nibble.data.batching import BatchStream

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(
        work / "base", quantization_config=quant, dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()}
    )
    model = PeftModel.from_pretrained(base, work / "init", is_trainable=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    assert len(decay) == len(params)  # LoRA matrices only: every group decays, as in nibble's optimizer
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=True)
    stream = BatchStream(data, args.batch, pad, seed=0)

    def step() -> tuple[float, int]:
        batch = stream.next_batch()
        tokens = int(batch["attention_mask"].sum())
        batch = {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), tokens

    return {"step": step, "note": "bitsandbytes Linear4bit, PEFT LoRA"}


def measure(name: str, load, args: argparse.Namespace, work: Path, data, pad: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    stack = load(args, work, data, pad)
    load_s = time.perf_counter() - start
    losses, rates = [], []
    for s in range(WARMUP + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, tokens = stack["step"]()
        torch.cuda.synchronize()
        losses.append(loss)
        if s >= WARMUP:
            rates.append(tokens / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() - before
    if args.profile and name == "nibble":
        profile(stack["step"], Path(args.profile))
    result = {"name": name, "losses": losses, "rates": rates, "peak": peak, "load_s": load_s, "note": stack["note"]}
    del stack
    gc.collect()
    torch.cuda.empty_cache()
    return result


def profile(step, trace: Path) -> None:
    """Two more steps under the profiler: the top CUDA kernels, the cross-entropy kernels' share of GPU time, the
    host time per kernel launch; a Chrome trace written to ``trace``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=15))
    kernels = [e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    gpu = sum(e.self_device_time_total for e in kernels) or 1
    ce = sum(e.self_device_time_total for e in kernels if any(w in e.key.lower() for w in ("cross", "logsumexp")))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    host = sum(e.self_cpu_time_total for e in events if e.key.startswith(("cudaLaunch", "cuLaunch")))
    print(f"cross-entropy kernels: {100 * ce / gpu:.1f}% of GPU time; {launches} launches, "
          f"{host / max(launches, 1):.1f} us host time each; trace: {trace}")  # fmt: skip


def versions() -> str:
    import bitsandbytes
    import peft
    import transformers

    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "not installed"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tri}, transformers {transformers.__version__},"
        f" peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=QWEN3_06B["num_hidden_layers"], help="blocks (default 28)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument("--seq", type=int, default=512, help="longest row in tokens (default 512)")
    parser.add_argument("--steps", type=int, default=20, help=f"timed steps after {WARMUP} warm-up steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--profile", metavar="TRACE.json", help="profile two more nibble steps; write a Chrome trace")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench_train_cuda.py needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() "
            "is False); run it on a machine with one"
        )
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"bench_train_cuda.py needs the reference stack: {exc}; pip install -e '.[dev]'") from None

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pad = build_model(work / "base", args.layers)
        data = make_data(args, pad)
        ours = measure("nibble", run_nibble, args, work, data, pad)  # first: it writes the initial adapter
        ref = measure("transformers+PEFT+bnb", run_reference, args, work, data, pad)

    speed = statistics.median(ours["rates"]) / statistics.median(ref["rates"])
    memory = ours["peak"] / ref["peak"]
    diff = max(abs(a - b) for a, b in zip(ours["losses"], ref["losses"], strict=True))
    props = torch.cuda.get_device_properties(0)
    print(f"# bench_train_cuda: QLoRA (NF4) instruction tuning, {datetime.date.today()}")
    print(f"# GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB); {versions()}")
    print(f"# model: Qwen3-0.6B config with {args.layers} layers, random bf16 weights; batch {args.batch} x "
          f"<= {args.seq} tokens (response-only loss), LoRA r={args.rank} on all 7 projections, bf16, "
          f"{args.steps} timed steps after {WARMUP}")  # fmt: skip
    print()
    print("| stack | tokens/s | vs ref | peak MiB | vs ref | mean loss (last 5) | load s | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for st, s_ratio, m_ratio in ((ours, speed, memory), (ref, 1.0, 1.0)):
        print(
            f"| {st['name']} | {statistics.median(st['rates']):.0f} | {s_ratio:.2f}x | {st['peak'] / 2**20:.0f} | "
            f"{m_ratio:.2f}x | {sum(st['losses'][-5:]) / 5:.4f} | {st['load_s']:.1f} | {st['note']} |"
        )
    print(f"\nlargest per-step loss difference: {diff:.2e} (bf16; first losses {ours['losses'][0]:.4f} vs "
          f"{ref['losses'][0]:.4f})")  # fmt: skip
    print(f"targets: tokens/s >= 2.5x: {'met' if speed >= 2.5 else 'NOT met'} ({speed:.2f}x); "
          f"peak memory <= 0.7x: {'met' if memory <= 0.7 else 'NOT met'} ({memory:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()

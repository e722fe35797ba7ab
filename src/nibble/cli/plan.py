"""``nibble plan``: how much memory a model takes in each format, and what a training run would need."""

from __future__ import annotations

import argparse
from dataclasses import fields

from nibble.model.memory import METHODS, WEIGHT_FORMATS, PlanOptions, format_rows, plan_rows

_DEFAULTS = {f.name: f.default for f in fields(PlanOptions)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the memory a model needs for QLoRA, LoRA or full fine-tuning",
        description="Print a model's weight sizes in fp32/bf16/NF4/INT4 and a memory estimate for a training run "
        "(weights, LoRA parameters, gradients, AdamW state, activations with and without checkpointing). "
        "GB = 10^9 bytes, MB = 10^6.",
    )
    parser.add_argument("--model", required=True, help="model directory, config.json file or .gguf file")
    parser.add_argument("--method", choices=METHODS, default=_DEFAULTS["method"], help="training method")
    parser.add_argument("--format", choices=["nf4", "int4"], default=_DEFAULTS["format"], help="4-bit format (qlora)")
    parser.add_argument("--double-quant", action="store_true", help="NF4 with 8-bit block scales (qlora)")
    parser.add_argument("--blocksize", type=int, default=_DEFAULTS["blocksize"], help="NF4 elements per block")
    parser.add_argument("--group-size", type=int, default=_DEFAULTS["group_size"], help="INT4 inputs per scale")
    parser.add_argument("--task", choices=["causal_lm", "classify"], default=_DEFAULTS["task"])
    parser.add_argument("--num-labels", type=int, default=_DEFAULTS["num_labels"], help="classifier outputs")
    parser.add_argument("--seq-len", type=int, default=_DEFAULTS["seq_len"], help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="sequences per step")
    parser.add_argument("--lora-rank", type=int, default=_DEFAULTS["lora_rank"], help="LoRA rank r")
    parser.add_argument(
        "--lora-targets",
        default=",".join(_DEFAULTS["lora_targets"]),
        help="comma-separated projections with LoRA adapters, or all-linear (default q_proj,v_proj)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=_DEFAULTS["dtype"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.model.config import ModelConfig
    from nibble.model.loading import is_gguf
    from nibble.model.model import PROJECTIONS

    if is_gguf(args.model):
        from nibble.io.gguf import open_gguf

        config = ModelConfig.from_hf(open_gguf(args.model).config)  # the metadata suffices: nothing is converted
    else:
        config = ModelConfig.from_hf(args.model)
    targets = PROJECTIONS if args.lora_targets == "all-linear" else tuple(args.lora_targets.split(","))
    opts = PlanOptions(
        method=args.method,
        format=args.format,
        double_quant=args.double_quant,
        blocksize=args.blocksize,
        group_size=args.group_size,
        task=args.task,
        num_labels=args.num_labels,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lora_rank=args.lora_rank,
        lora_targets=targets,
        dtype=args.dtype,
    )
    c = config
    print(
        f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
        f"heads {c.num_attention_heads}/{c.num_key_value_heads}, head_dim {c.head_dim}, vocab {c.vocab_size}"
    )
    print()
    print(f"{'weights':<32}{'params':>10}" + "".join(f"{fmt:>11}" for fmt in WEIGHT_FORMATS))
    for name, params, sizes in format_rows(config, opts.blocksize, opts.group_size):
        cells = "".join(f"{_gb(sizes[fmt]):>11}" for fmt in WEIGHT_FORMATS)
        print(f"{name:<32}{_count(params):>10}{cells}")
    print()
    print(
        f"{args.method} run: task {args.task}, batch {args.batch_size} x {args.seq_len} tokens, "
        f"dense dtype {args.dtype}"
    )
    rows = plan_rows(config, opts)
    width = max(len(name) for name, _, _ in rows) + 2
    for name, params, size in rows:
        print(f"{name:<{width}}{_count(params) if params else '':>10}{_gb(size):>11}")
    return 0


def _gb(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale, smallest in (("GB", 1e9, 1e7), ("MB", 1e6, 1e5)):
        if size >= smallest:
            return f"{size / scale:.2f} {unit}"
    return f"{size / 1e3:.2f} KB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)

"""``nibble plan [CONFIG.yaml] --model DIR|FILE [...]``: how much memory a model takes in each format, and what
the training run those options describe (the same flags and YAML keys as ``nibble train``) would need."""

from __future__ import annotations

import argparse

from nibble.cli._common import add_config_flags, config_overrides
from nibble.model.memory import WEIGHT_FORMATS, PlanOptions, format_rows, plan_rows

# The TrainConfig fields that decide a run's memory.
PLAN_FIELDS = (
    "model",
    "task",
    "method",
    "quant_format",
    "double_quant",
    "blocksize",
    "group_size",
    "lora_rank",
    "lora_targets",
    "max_seq_len",
    "batch_size",
    "dtype",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the memory a model needs for QLoRA, LoRA or full fine-tuning",
        description="Print a model's weight sizes in fp32/bf16/NF4/INT4 and a memory estimate for the training run "
        "the options describe (weights, LoRA parameters, gradients, AdamW state, activations with and without "
        "checkpointing). Options and CONFIG.yaml are those of nibble train. GB = 10^9 bytes, MB = 10^6.",
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a nibble train YAML file")
    add_config_flags(parser, PLAN_FIELDS)
    parser.add_argument("--num-labels", type=int, default=2, help="classifier outputs (task classify; default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.io.gguf import is_gguf
    from nibble.model.config import ModelConfig
    from nibble.nn.lora import resolve_targets
    from nibble.train.config import resolve_config
    from nibble.train.run import MODEL_TASKS

    config = resolve_config(args.config, config_overrides(args), required=("model",))
    gguf_bytes = None
    if is_gguf(config.model):
        from nibble.io.gguf import open_gguf

        source = open_gguf(config.model)
        model = ModelConfig.from_hf(source.config)  # the metadata suffices: nothing is converted
        gguf_bytes = source.projection_bytes()
    else:
        model = ModelConfig.from_hf(config.model)
    opts = PlanOptions(
        method=config.method,
        quant=config.quant_spec,
        task=MODEL_TASKS[config.task],
        num_labels=args.num_labels,
        seq_len=config.max_seq_len,
        batch_size=config.batch_size,
        lora_rank=config.lora_rank,
        lora_targets=resolve_targets(config.lora_targets),
        dtype=config.dtype,
        gguf_projection_bytes=gguf_bytes,
    )
    c = model
    print(
        f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
        f"heads {c.num_attention_heads}/{c.num_key_value_heads}, head_dim {c.head_dim}, vocab {c.vocab_size}"
    )
    print()
    print(f"{'weights':<32}{'params':>10}" + "".join(f"{fmt:>11}" for fmt in WEIGHT_FORMATS))
    for name, params, sizes in format_rows(model, config.quant_spec):
        cells = "".join(f"{_gb(sizes[fmt]):>11}" for fmt in WEIGHT_FORMATS)
        print(f"{name:<32}{_count(params):>10}{cells}")
    print()
    print(
        f"{config.method} run: task {config.task}, batch {config.batch_size} x {config.max_seq_len} tokens, "
        f"dense dtype {config.dtype}"
    )
    rows = plan_rows(model, opts)
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

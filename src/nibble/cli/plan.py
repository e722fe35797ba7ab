"""``nibble plan [CONFIG.yaml] --model DIR|FILE [...]``: how much memory a model takes in each format, and what
the training run those options describe (the same flags and YAML keys as ``nibble train``) would need."""

from __future__ import annotations

import argparse

from nibble.cli._common import add_config_flags, config_overrides

# The TrainConfig fields that decide a run's memory.
PLAN_FIELDS = (
    "model",
    "task",
    "method",
    "device",
    "memory_budget",
    "quant_format",
    "double_quant",
    "blocksize",
    "group_size",
    "cache_budget_mb",
    "lora_rank",
    "lora_targets",
    "lora_dropout",
    "train_embeddings",
    "gradient_checkpointing",
    "max_seq_len",
    "batch_size",
    "grad_accum",
    "dtype",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the memory a model needs for QLoRA, LoRA or full fine-tuning",
        description="Print a model's weight sizes in fp32/bf16/NF4/INT4 and a memory estimate for the training run "
        "the options describe (weights, dense copies of 4-bit weights, LoRA parameters, gradients, AdamW state, "
        "activations with and without checkpointing). With --method auto or --memory-budget, also the choice "
        "nibble train would make and the candidates it weighed. Options and CONFIG.yaml are those of nibble train. "
        "GB = 10^9 bytes, MB = 10^6.",
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a nibble train YAML file")
    add_config_flags(parser, PLAN_FIELDS)
    parser.add_argument("--num-labels", type=int, default=2, help="classifier outputs (task classify; default 2)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from nibble.devices import describe, dtype_name, resolve_device, resolve_dtype
    from nibble.io.gguf import is_gguf
    from nibble.model.config import ModelConfig
    from nibble.model.memory import RunPlan, plan_candidates, plan_rows
    from nibble.train.config import resolve_config
    from nibble.train.planning import fit_to_memory, plan_options, plan_space

    config = resolve_config(args.config, config_overrides(args), required=("model",))
    if is_gguf(config.model):
        from nibble.io.gguf import open_gguf

        model = ModelConfig.from_hf(open_gguf(config.model).config)  # the metadata suffices: nothing is converted
    else:
        model = ModelConfig.from_hf(config.model)
    device = resolve_device(config.device)
    asked = config.dtype
    config = replace(config, dtype=dtype_name(resolve_dtype(config.dtype, device)))
    c = model
    print(
        f"{c.model_type}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
        f"heads {c.num_attention_heads}/{c.num_key_value_heads}, head_dim {c.head_dim}, vocab {c.vocab_size}"
    )
    if c.moe is not None:
        moe, sparse = c.moe, sum(c.moe.is_sparse(i) for i in range(c.num_hidden_layers))
        print(
            f"experts: {moe.num_experts} per sparse layer ({sparse} of {c.num_hidden_layers}), "
            f"top-{moe.num_experts_per_tok}, width {moe.moe_intermediate_size}; all experts resident, activations "
            "for the routed tokens only"
        )
    print()
    _print_formats(model, config.quant_spec)
    print()
    print(describe(device, config.torch_dtype, asked))
    requested = config
    config, plan, source = fit_to_memory(config, model, args.num_labels, device)
    cache_limit = None
    if plan is not None:
        batch, methods, checkpointing = plan_space(requested)
        opts = plan_options(requested, model, num_labels=args.num_labels, device=device)
        print(f"memory budget {_gb(plan.budget_bytes)} ({source}); batch {batch} = micro-batch x accumulation steps")
        print(f"{'method':<8}{'checkpointing':>15}{'micro-batch':>13}{'estimate':>12}  fits")
        for cand in plan_candidates(model, opts, plan.budget_bytes, batch, methods, checkpointing):
            if isinstance(cand, RunPlan):
                row = (cand.method, cand.checkpointing, str(cand.batch_size), cand.estimate_bytes, "yes")
            else:
                row = (cand[0], cand[1], "1", cand[2], "no")
            print(f"{row[0]:<8}{'yes' if row[1] else 'no':>15}{row[2]:>13}{_gb(row[3]):>12}  {row[4]}")
        cache_limit = plan.budget_bytes - plan.estimate_bytes
    rows = plan_rows(model, plan_options(config, model, num_labels=args.num_labels, device=device), cache_limit)
    # the run's own total (the dense copies of 4-bit weights fill what the plan leaves of the budget): one number
    # in the plan line and the breakdown
    ours = len(rows) - (1 if config.gradient_checkpointing else 2)
    if plan is not None:
        print(f"plan: {replace(plan, estimate_bytes=rows[ours][2]).describe()}")
    print()
    print(
        f"{config.method} run: task {config.task}, micro-batch {config.batch_size} x {config.max_seq_len} tokens"
        f"{f' x {config.grad_accum} accumulation steps' if config.grad_accum > 1 else ''}, compute dtype "
        f"{config.dtype}{', gradient checkpointing' if config.gradient_checkpointing else ''}"
    )
    width = max(len(name) for name, _, _ in rows) + 2
    for i, (name, params, size) in enumerate(rows):
        mark = "  <- this run" if i == ours else ""
        print(f"{name:<{width}}{_count(params) if params else '':>10}{_gb(size):>11}{mark}")
    return 0


def _print_formats(model, spec) -> None:
    from nibble.model.memory import WEIGHT_FORMATS, format_rows

    print(f"{'weights':<32}{'params':>10}" + "".join(f"{fmt:>11}" for fmt in WEIGHT_FORMATS))
    for name, params, sizes in format_rows(model, spec):
        cells = "".join(f"{_gb(sizes[fmt]):>11}" for fmt in WEIGHT_FORMATS)
        print(f"{name:<32}{_count(params):>10}{cells}")


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

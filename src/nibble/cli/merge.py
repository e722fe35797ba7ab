"""``nibble merge --model DIR --adapter DIR --output DIR``: fold a LoRA adapter into a plain HF checkpoint."""

from __future__ import annotations

import argparse
import time

from nibble.cli._common import add_any_base_flag, add_device_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and write a plain Hugging Face checkpoint",
        description="Load the base as the adapter was trained (a QLoRA adapter on its 4-bit base, which is then "
        "dequantized; nothing is re-quantized), add each LoRA update B·A·scale to its weight, and write a "
        "checkpoint transformers loads as it is: *ForCausalLM, or *ForSequenceClassification with the trained "
        "head for classify adapters. The directory appears only when complete.",
    )
    parser.add_argument("--model", required=True, metavar="DIR|FILE", help="base model directory or .gguf file")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory (PEFT layout)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to create")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    add_any_base_flag(parser)
    add_device_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.devices import describe, resolve_device
    from nibble.model.merge import merge_adapter

    start = time.perf_counter()
    device = resolve_device(args.device)
    print(describe(device), flush=True)
    output, info = merge_adapter(
        args.model,
        args.adapter,
        args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
        device=device,
        any_base=args.any_base,
    )
    targets = info.config.get("target_modules")
    targets = ",".join(targets) if isinstance(targets, list) else targets
    base = f"{info.quant.format}-dequantized" if info.quant else "dense"
    print(
        f"merged a rank-{info.config['r']} {info.config.get('task_type')} adapter on {targets} into the {base} base; "
        f"wrote {output} ({args.dtype}) in {time.perf_counter() - start:.1f} s"
    )
    if info.task == "classify" and info.run.pooling == "mean":
        print(
            "note: the classifier pools the mean of the tokens; nibble loads it that way (nibble.json), but "
            "transformers' *ForSequenceClassification reads the last token only"
        )
    return 0

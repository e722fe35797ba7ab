"""``nibble quantize``: write a bitsandbytes-compatible 4-bit NF4 checkpoint that transformers loads unchanged."""

from __future__ import annotations

import argparse
import time

from nibble.cli._common import add_device_flag
from nibble.quant.spec import NF4_BLOCKSIZES, QuantSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="store a model's block projections in NF4 (bitsandbytes layout)",
        description="Quantize the seven block projections of a Hugging Face checkpoint to NF4 and write them in "
        "bitsandbytes' serialized layout, with quantization_config in config.json and the tokenizer files copied.",
    )
    parser.add_argument("--model", required=True, help="model directory (config.json + safetensors) or .gguf file")
    parser.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    parser.add_argument("--format", choices=["nf4"], default="nf4", help="4-bit format (default nf4)")
    parser.add_argument("--double-quant", action="store_true", help="also quantize the block scales (8-bit)")
    parser.add_argument(
        "--blocksize",
        type=int,
        choices=NF4_BLOCKSIZES,
        default=QuantSpec().blocksize,
        help=f"elements per NF4 block (default {QuantSpec().blocksize})",
    )
    add_device_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.devices import describe, resolve_device
    from nibble.model.loading import resolve_model_dir
    from nibble.model.quantize import quantize_checkpoint

    start = time.perf_counter()
    device = resolve_device(args.device)
    print(describe(device), flush=True)
    spec = QuantSpec(args.format, blocksize=args.blocksize, double_quant=args.double_quant)
    stats = quantize_checkpoint(resolve_model_dir(args.model), args.output, spec, device)
    seconds = time.perf_counter() - start
    print(
        f"quantized {stats['quantized']} projections to {args.format}"
        f"{' with double quantization' if args.double_quant else ''}, kept {stats['kept']} tensors: "
        f"{stats['bytes_in'] / 1e6:.1f} MB -> {stats['bytes_out'] / 1e6:.1f} MB in {seconds:.1f} s; wrote {args.output}"
    )
    return 0

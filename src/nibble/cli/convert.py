"""``nibble convert``: turn a GGUF file into a Hugging Face model directory."""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a GGUF file into an HF model directory",
        description="Convert a llama/qwen2/qwen3 GGUF file (F32, F16, BF16 or quantized tensors, dequantized) into "
        "an HF model directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json. The "
        "directory appears only when complete.",
    )
    parser.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file to convert")
    parser.add_argument("--output", required=True, metavar="DIR", help="the directory to create")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weight dtype of model.safetensors (default float32: the dequantized values exactly)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it already exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.io.gguf import convert_gguf

    start = time.perf_counter()
    output = convert_gguf(
        args.gguf, args.output, dtype=args.dtype, overwrite=args.overwrite, log=lambda line: print(f"convert: {line}")
    )
    print(f"convert: wrote {output} in {time.perf_counter() - start:.1f} s")
    return 0

"""``nibble export --model M [--adapter A] --output FILE.gguf --quant TYPE``: a GGUF file llama.cpp runs."""

from __future__ import annotations

import argparse
import time

from nibble.cli._common import add_any_base_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    from nibble.model.export import QUANTS

    parser = subparsers.add_parser(
        "export",
        help="write a model (with its LoRA adapter merged), or the adapter alone, as a GGUF file for llama.cpp",
        description="Merge the adapter into the base it was trained on (a 4-bit base is dequantized, never "
        "re-quantized before the merge), quantize each tensor once into the requested GGUF type, and write a file "
        "llama.cpp loads: architecture metadata (llama for Llama/SmolLM/Mistral, qwen2, qwen3), the tokenizer "
        "and chat template. Types: f32, f16, bf16, q8_0, q6_k, q4_k, q4_1, q4_0 (no other type is written: "
        "nibble has no exact quantizer for it). The LM head takes q6_k under the 4-bit types, as llama-quantize "
        "does; rows that are not a multiple of 256 values fall back from q4_k to q5_0 and from q6_k to q8_0. "
        "A quantization report (types per tensor; perplexity of the exported file against the float model on "
        "held-out text) is printed and saved as <FILE stem>.report.json. Classification adapters have no GGUF "
        "form (llama.cpp runs causal LMs).",
    )
    parser.add_argument("--model", required=True, metavar="DIR|FILE", help="base model directory or .gguf file")
    parser.add_argument("--adapter", metavar="DIR", help="CAUSAL_LM LoRA adapter to merge (nibble train's OUT/adapter)")
    parser.add_argument("--output", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    parser.add_argument("--quant", choices=list(QUANTS), default="f16", help="GGUF type of the weights (default f16)")
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="write the adapter alone as a llama.cpp LoRA GGUF (f32/f16/bf16), to apply at run time with --lora on "
        "the base GGUF (the very .gguf file for an adapter trained with --quant-format gguf)",
    )
    parser.add_argument(
        "--eval-data",
        metavar="FILE",
        help="held-out text for the report: instruction .jsonl (scored on responses) or plain text (default: the "
        "adapter's run validation data, else nibble's sample text)",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="score about this many tokens of it (default 2048; 0 skips the perplexity)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    add_any_base_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.train.gguf_export import export_gguf

    start = time.perf_counter()
    export_gguf(
        args.model,
        args.output,
        quant=args.quant,
        adapter=args.adapter,
        adapter_only=args.adapter_only,
        eval_data=args.eval_data,
        eval_tokens=args.eval_tokens,
        overwrite=args.overwrite,
        any_base=args.any_base,
    )
    print(f"export: done in {time.perf_counter() - start:.1f} s")
    return 0

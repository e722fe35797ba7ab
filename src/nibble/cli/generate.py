"""``nibble generate --model DIR|FILE [--adapter DIR] --prompt TEXT [...]``: stream a model's answer to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from nibble.cli._common import MAX_TOKENS, add_any_base_flag, add_cache_budget_flag, add_device_flag, bounded
from nibble.quant.spec import FORMATS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a prompt (optionally with a LoRA adapter), streamed to stdout",
        description="Continue a prompt with a causal LM and print the new text as it is generated. The prompt is "
        "rendered with the model's chat template as a user message unless --no-chat (or the model has none). "
        "Greedy at temperature 0 (the default); generation stops at the end-of-sequence token. The device line and "
        "the timing go to stderr.",
    )
    parser.add_argument("--model", required=True, metavar="DIR|FILE", help="model directory or .gguf file")
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter (PEFT layout, task CAUSAL_LM) to apply")
    parser.add_argument("--prompt", required=True, help="the text to answer or continue")
    parser.add_argument("--system", help="a system message (chat template only)")
    parser.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text, no chat template")
    parser.add_argument(
        "--thinking",
        choices=("on", "off"),
        help="pass enable_thinking to the chat template (Qwen3: off opens the answer with an empty think block); "
        "default: the template's own default",
    )
    tokens = bounded(int, 1, MAX_TOKENS)
    parser.add_argument("--max-new-tokens", type=tokens, default=128, help="at most this many new tokens")
    parser.add_argument("--temperature", type=bounded(float, 0, 100), default=0.0, help="0 = greedy (default 0)")
    parser.add_argument("--top-k", type=tokens, help="sample from the k most likely tokens only")
    mass = bounded(float, 0, 1, open_low=True)
    parser.add_argument("--top-p", type=mass, help="sample from the smallest set holding this much mass")
    parser.add_argument("--seed", type=int, help="seed for sampling (default: unseeded)")
    parser.add_argument("--quantize", choices=FORMATS, help="store the base in 4 bits (no adapter only)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the weights and activations (default auto: bfloat16 where the device computes it natively, "
        "float16 on older CUDA GPUs, else float32)",
    )
    add_cache_budget_flag(parser)
    add_any_base_flag(parser)
    add_device_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.devices import describe, resolve_device, resolve_dtype
    from nibble.model.generate import generate_text, load_generator

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_generator(
        args.model,
        args.adapter,
        quantize=args.quantize,
        cache_budget_mb=args.cache_budget_mb,
        device=device,
        dtype=dtype,
        any_base=args.any_base,
    )
    print(describe(device, dtype, args.dtype), file=sys.stderr, flush=True)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    start = time.perf_counter()
    generate_text(
        model,
        tokenizer,
        args.prompt,
        chat=False if args.no_chat else None,
        system=args.system,
        thinking=None if args.thinking is None else args.thinking == "on",
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        on_text=write,
    )
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[generated in {seconds:.1f} s]", file=sys.stderr)
    return 0

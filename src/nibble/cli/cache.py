"""``nibble cache [list|size|clear] [KIND ...]``: what nibble keeps on disk between commands, and removing it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from nibble.train.caches import KINDS

    parser = subparsers.add_parser(
        "cache",
        help="list, size or clear what nibble caches on disk (GGUF conversions, 4-bit bases, token caches, downloads)",
        description="nibble keeps GGUF conversions ($NIBBLE_CACHE/converted), quantized 4-bit bases "
        "($NIBBLE_CACHE/quantized), tokenized data ($NIBBLE_TOKEN_CACHE, default $NIBBLE_CACHE/tokens) and "
        "downloads ($NIBBLE_CACHE); $NIBBLE_CACHE defaults to ~/.cache/nibble. Every entry is made again when "
        "needed, so clearing costs time only.",
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("list", "size", "clear"),
        default="size",
        help="list: every entry with its size; size: the total per kind and where it lives (default); clear: "
        "remove the entries",
    )
    parser.add_argument("kinds", nargs="*", metavar="KIND", help=f"only these kinds: {', '.join(KINDS)} (default all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.io.files import format_size
    from nibble.train.caches import cache_entries, cache_location, check_kinds, clear_caches

    kinds = check_kinds(args.kinds)
    if args.action == "clear":
        removed = clear_caches(kinds)
        print(f"cache: removed {_entries(len(removed))}, {format_size(sum(e.size for e in removed))}")
        return 0
    entries = cache_entries(kinds)
    if args.action == "list":
        for entry in entries:
            print(f"{entry.kind:<10}{format_size(entry.size):>11}  {entry.path}")
    for kind in kinds:
        mine = [e for e in entries if e.kind == kind]
        size = format_size(sum(e.size for e in mine))
        print(f"{kind:<10}{size:>11}  {_entries(len(mine))} in {cache_location(kind)}")
    print(f"{'total':<10}{format_size(sum(e.size for e in entries)):>11}")
    return 0


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"

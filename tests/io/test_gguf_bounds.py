"""GGUF files whose claims outgrow their bytes: work and memory stay in proportion to the file, or the file is
refused with one line.

A SentencePiece vocabulary without merges has them rebuilt from its token scores; a token of 70,000 characters
used to cost the square of its length (3.6 GB). A block count of 10^9 with a model's worth of tiny tensors used
to build a table of every block's tensor names before any was checked.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import gguf
import pytest

from gguf_files import tiny_model, write_gguf
from nibble.errors import NibbleError
from nibble.io.gguf import GGUFFile, convert_gguf
from nibble.io.gguf.tokenizer import merges_from_scores

PIECES = ["\u2581the", "\u2581a", "th", "he", "the", "an", "\u2581an", "bb", "bbb"]


def sentencepiece_file(path: Path, extra: list[str]) -> Path:
    """A llama-type (SentencePiece BPE) tokenizer-only file: <unk> <s> </s>, single characters, ``PIECES`` and
    ``extra``, scored in order (no merges stored: they are rebuilt from the scores)."""
    letters = sorted(set("".join(PIECES)) | {"\u2581", "b", "c"})
    tokens = ["<unk>", "<s>", "</s>", *letters, *PIECES, *extra]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * (3 + len(letters)) + [-float(i) for i in range(len(PIECES) + len(extra))])
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer.add_token_types(types + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def every_split(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The oracle: every split of every token into two vocabulary pieces, in the documented order."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores, strict=True):
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        splits = [p for p in splits if p[0] in index and p[1] in index]
        splits.sort(key=lambda p: (index[p[0]], index[p[1]]))
        found += [(a, b, score) for a, b in splits]
    found.sort(key=lambda c: (-c[2], -len(c[0]), -len(c[1])))
    return [(a, b) for a, b, _ in found]


def peak_bytes(build) -> int:
    tracemalloc.start()
    try:
        build()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_merges_from_scores_are_every_split_into_vocabulary_pieces():
    tokens = ["a", "b", "c", "ab", "bc", "abc", "cab", "ca", "abca", "bcab", "x" * 40, "x" * 20, "x"]
    scores = [0.0, 0.0, 0.0, -1.0, -1.0, -2.0, -2.0, -3.0, -4.0, -4.0, -5.0, -6.0, 0.0]
    assert merges_from_scores("f", tokens, scores) == every_split(tokens, scores)
    assert ("x" * 20, "x" * 20) in merges_from_scores("f", tokens, scores)


def test_a_70k_character_token_costs_memory_in_proportion_to_the_file(tmp_path):
    long = "c" * 70_000
    path = sentencepiece_file(tmp_path / "long.gguf", [long, "b" * 35_000, "b" * 70_000])
    file = GGUFFile(path)
    start = time.perf_counter()
    peak = peak_bytes(file.tokenizer)
    # the long tokens are stored as text in the file: a few copies of them, never their square (4.9 GB)
    assert peak < 20 * path.stat().st_size, (peak, path.stat().st_size)
    assert time.perf_counter() - start < 30  # (a bound on a hang, not a timing claim)
    tokenizer = file.tokenizer()
    assert tokenizer.token_to_id(long) is not None
    # the one split of a long token into two pieces is found: b*35000 + b*35000
    tokens = file.meta("tokenizer.ggml.tokens")
    merges = merges_from_scores(path, tokens, file.meta("tokenizer.ggml.scores"))
    assert ("b" * 35_000, "b" * 35_000) in merges
    assert [m for m in merges if len(m[0]) < 100] == every_split(
        [t if len(t) < 100 else f"<long {i}>" for i, t in enumerate(tokens)], file.meta("tokenizer.ggml.scores")
    )


def test_a_vocabulary_implying_a_square_of_merges_is_refused_in_one_line(tmp_path):
    # "c" * 1 .. "c" * 2000: every token splits into every pair of shorter ones (2 million merges from 2 MB)
    path = sentencepiece_file(tmp_path / "chain.gguf", ["c" * n for n in range(2, 2001)])

    def build():
        with pytest.raises(NibbleError) as info:
            GGUFFile(path).tokenizer()
        message = str(info.value)
        assert str(path) in message and "merges" in message and "corrupt" in message and "\n" not in message

    peak = peak_bytes(build)
    assert peak < 20 * path.stat().st_size, (peak, path.stat().st_size)


@pytest.mark.parametrize("blocks", [10**7, 10**9])
def test_a_block_count_the_tensors_cannot_fill_is_refused_in_one_line(tmp_path, blocks):
    model = tiny_model("qwen3", tie_word_embeddings=True)
    model.config.num_hidden_layers = blocks  # the metadata claims it; the file holds the model's 2 blocks
    path = write_gguf(tmp_path / "claims.gguf", model)
    out = tmp_path / "out"
    holder = {}

    def convert():
        with pytest.raises(NibbleError) as info:
            convert_gguf(path, out)
        holder["message"] = str(info.value)

    peak = peak_bytes(convert)
    message = holder["message"]
    assert str(path) in message and f"says {blocks} blocks" in message and "\n" not in message, message
    assert peak < 20 * path.stat().st_size + (8 << 20), peak
    assert not out.exists()


@pytest.mark.parametrize("quantize", ["gguf", "nf4", None])
@pytest.mark.parametrize(("arch", "blocks"), [("llama", 10**7), ("qwen2", 10**8)])
def test_a_block_count_claim_is_refused_on_every_load_path(tmp_path, monkeypatch, arch, blocks, quantize):
    """The same claim through load_model: read natively, converted then quantized, or converted dense."""
    from nibble.model import load_model

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    model = tiny_model(arch)
    model.config.num_hidden_layers = blocks
    path = write_gguf(tmp_path / "claims.gguf", model)
    holder = {}

    def load():
        with pytest.raises(NibbleError) as info:
            load_model(path, quantize=quantize)
        holder["message"] = str(info.value)

    peak = peak_bytes(load)
    assert f"'{arch}.block_count' says {blocks} blocks" in holder["message"] and "\n" not in holder["message"]
    assert peak < 20 * path.stat().st_size + (8 << 20), peak


# Builds a small file's tokenizer first (imports, the tokenizers library's own memory), then limits RLIMIT_DATA to
# what the process holds plus 20 times the file and 64 MiB, and builds each hostile file's tokenizer under it.
UNDER_LIMIT = """
import resource, sys
from nibble.errors import NibbleError
from nibble.io.gguf import GGUFFile

small, *hostile = sys.argv[1:]
GGUFFile(small).tokenizer()
held = int([line for line in open("/proc/self/status") if line.startswith("VmData")][0].split()[1]) * 1024
for path in hostile:
    import os
    limit = held + 20 * os.path.getsize(path) + (64 << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    try:
        GGUFFile(path).tokenizer()
        print("BUILT", path, flush=True)
    except NibbleError as exc:
        print("REFUSED", path, str(exc).count(chr(10)), flush=True)
"""


def test_hostile_gguf_vocabularies_stay_within_a_memory_limit(tmp_path):
    """The 70,000-character token and the vocabulary implying a square of merges, each under RLIMIT_DATA at what
    the process held plus 20x the file and 64 MiB (the whole process: the tokenizers library's memory counts)."""
    import os
    import subprocess
    import sys

    small = sentencepiece_file(tmp_path / "small.gguf", ["bbbb"])
    long = sentencepiece_file(tmp_path / "long.gguf", ["c" * 70_000, "b" * 35_000, "b" * 70_000])
    chain = sentencepiece_file(tmp_path / "chain.gguf", ["c" * n for n in range(2, 2001)])
    command = [sys.executable, "-c", UNDER_LIMIT, str(small), str(long), str(chain)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"BUILT {long}" in result.stdout and f"REFUSED {chain} 0" in result.stdout, result.stdout

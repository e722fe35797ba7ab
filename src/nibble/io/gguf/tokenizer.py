"""The tokenizer of a GGUF file, both ways: ``tokenizer.ggml.*`` metadata rebuilt as a ``tokenizers.Tokenizer``
(and its ``tokenizer_config.json``), and a ``tokenizer.json`` written as those keys.

Facts this relies on (llama.cpp's loader and converter):
- ``tokenizer.ggml.model`` ``gpt2`` is byte-level BPE (tokens spelled in the GPT-2 byte alphabet, merges
  ``"a b"``) whose split rule is chosen by ``tokenizer.ggml.pre``; ``llama`` is SentencePiece BPE with byte
  fallback (``<0xXX>`` tokens), whose merges are given or implied by the token scores (higher merges first).
  Both are rebuilt the way transformers rebuilds them from a GGUF, so the ids are the same.
- The token list has one entry per embedding row: rows past the tokenizer are ``[PADn]`` tokens of type UNUSED;
  token types are 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nibble.errors import NibbleError
from nibble.io.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nibble.io.gguf.metadata import GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Pre-tokenizer splits for ``tokenizer.ggml.pre`` values whose vocabularies were not learned on GPT-2's
# split; any other value uses GPT-2's (the byte-level pre-tokenizer's built-in regex).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` values that split every digit off before GPT-2's split (llama.cpp's "\p{N}" rule).
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell")
_PRE_TOKENIZER_SPLITS = {
    "llama3": LLAMA3_SPLIT,
    "llama-v3": LLAMA3_SPLIT,
    "llama-bpe": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "falcon3": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}
# Bounds on rebuilding merges from token scores, so that the work and the merges list grow with the vocabulary's
# size rather than with the square of its longest token: a real SentencePiece token (at most 16 characters by
# default, some tens in a few vocabularies) has fewer splits into two vocabulary pieces than this.
_MERGES_PER_TOKEN = 32
_WORK_PER_CHARACTER = 64


def split_merge(source: str | Path, merge: Any) -> tuple[str, str]:
    """One BPE merge as its two pieces: ``"a b"`` (GGUF, tokenizer.json) or ``["a", "b"]`` (newer tokenizer.json).

    Raises:
        NibbleError: anything else, naming ``source``.
    """
    if isinstance(merge, str):
        left, sep, right = merge.partition(" ")
        pair: tuple[Any, ...] = (left, right) if sep else ()
    else:
        pair = tuple(merge) if isinstance(merge, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(piece, str) and piece for piece in pair):
        raise NibbleError(f"{source}: malformed merge {repr(merge)[:60]} (two pieces, 'a b' or [a, b])")
    return pair[0], pair[1]


def merges_from_scores(source: str | Path, tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two vocabulary pieces, best
    token score first, then longer left piece, then longer right piece; ties keep token order, and the splits of
    one token are ordered by the ids of their pieces.

    Only split points whose two lengths are both lengths of some token are tried, and the pieces kept are the
    vocabulary's own strings, so a 70,000-character token costs nothing when no pieces of its length exist.

    Raises:
        NibbleError: the vocabulary implies far more merges (or work) than its size allows: not a real
            SentencePiece vocabulary.
    """
    index = {token: i for i, token in enumerate(tokens)}
    score = dict(zip(tokens, scores, strict=True))
    lengths = sorted({len(token) for token in index})
    present = set(lengths)
    work_left = _WORK_PER_CHARACTER * sum(map(len, index)) + (1 << 20)
    merges_left = _MERGES_PER_TOKEN * len(index) + (1 << 16)
    candidates: list[tuple[str, str, float]] = []
    for token, token_score in score.items():
        size, splits = len(token), []
        for k in lengths[: bisect_left(lengths, size)]:
            if size - k not in present:
                continue
            work_left -= size
            left, right = index.get(token[:k]), index.get(token[k:])
            if left is not None and right is not None:
                splits.append((left, right))
        merges_left -= len(splits)
        if work_left < 0 or merges_left < 0:
            raise NibbleError(
                f"{source}: the token scores imply more merges than a SentencePiece vocabulary of {len(index)} "
                f"tokens has (at token {index[token]}, {size} characters); the tokenizer metadata is corrupt"
            )
        candidates.extend((tokens[a], tokens[b], token_score) for a, b in sorted(splits))
    candidates.sort(key=lambda c: (-c[2], -len(c[0]), -len(c[1])))
    return [(left, right) for left, right, _ in candidates]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes keep their character, the
    other 68 bytes take the characters from U+0100 upward in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spelled = {b: chr(b) for b in keep}
    extra = (b for b in range(256) if b not in spelled)
    spelled.update({b: chr(0x100 + n) for n, b in enumerate(extra)})
    return spelled


def _byte_level(file: GGUFFile, tokens: list[str], control: list[str]):
    """``gpt2``: byte-level BPE with the file's merges and its pre-tokenizer's split; returns the tokenizer,
    its vocabulary and the control tokens that are real vocabulary entries."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    merges = file.meta("tokenizer.ggml.merges", None)
    if merges is None:
        raise NibbleError(f"{file.path}: byte-level tokenizer without 'tokenizer.ggml.merges'")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spell(token: str) -> str:
        # a token written outside the byte alphabet (a raw added token) is respelled from its UTF-8 bytes
        return token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {spell(token): i for i, token in enumerate(tokens)}
    tokenizer = Backend(BPE(vocab, [split_merge(file.path, m) for m in merges], fuse_unk=False))
    pre = file.meta("tokenizer.ggml.pre", None)
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if pre in DIGIT_SPLIT_PRE:
        parts = [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(parts)
    elif split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        parts = [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(parts)
    tokenizer.decoder = decoders.ByteLevel()
    # a control token outside the byte alphabet is no real vocabulary entry (a llama.cpp mislabel)
    return tokenizer, vocab, [t for t in control if set(t) <= letters]


def _sentencepiece(file: GGUFFile, tokens: list[str]):
    """``llama``: SentencePiece BPE with byte fallback, its merges given or implied by the token scores."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {token: i for i, token in enumerate(tokens)}
    merges = file.meta("tokenizer.ggml.merges", None)
    if merges is not None:
        pairs = [split_merge(file.path, m) for m in merges]
    else:
        scores = file.meta("tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise NibbleError(f"{file.path}: {len(scores)} token scores for {len(tokens)} tokens")
        pairs = merges_from_scores(file.path, tokens, scores)
    tokenizer = Backend(BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer, vocab


def build_tokenizer(file: GGUFFile):
    """The tokenizer ``file``'s ``tokenizer.ggml.*`` metadata describes, as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, processors

    kind = file.meta("tokenizer.ggml.model")
    tokens: list[str] = file.meta("tokenizer.ggml.tokens")
    token_types: list[int] = file.meta("tokenizer.ggml.token_type", [])
    # token types are optional metadata; when present there is one per token
    if token_types and len(token_types) != len(tokens):
        raise NibbleError(f"{file.path}: {len(token_types)} token types for {len(tokens)} tokens")
    control = [t for t, kind_ in zip(tokens, token_types, strict=False) if kind_ == CONTROL]
    if kind == "gpt2":
        tokenizer, vocab, control = _byte_level(file, tokens, control)
    elif kind == "llama":
        tokenizer, vocab = _sentencepiece(file, tokens)
    else:
        raise NibbleError(
            f"{file.path}: tokenizer model '{kind}' is not supported (gpt2 byte-level BPE and llama "
            "SentencePiece BPE are)"
        )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind_ in zip(tokens, token_types, strict=False) if kind_ == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    config = tokenizer_config(file)
    bos, eos = config.get("bos_token"), config.get("eos_token")
    add_bos = config["add_bos_token"] and bos is not None
    add_eos = config["add_eos_token"] and eos is not None

    def template(sequence: str, type_id: int) -> list[str]:
        return [*([f"{bos}:{type_id}"] if add_bos else []), f"${sequence}:{type_id}"] + (
            [f"{eos}:{type_id}"] if add_eos else []
        )

    specials = {token: tokenizer.token_to_id(token) for token, on in ((bos, add_bos), (eos, add_eos)) if on}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=list(specials.items())
    )
    return tokenizer


def tokenizer_config(file: GGUFFile) -> dict[str, Any]:
    """``tokenizer_config.json`` of ``file``: special tokens, whether BOS/EOS are added, the chat template."""
    tokens: list[str] = file.meta("tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = file.meta(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise NibbleError(f"{file.path}: {name} token id {token_id} is outside the {len(tokens)} tokens")
            config[f"{name}_token"] = tokens[int(token_id)]
    # SentencePiece vocabularies add BOS unless the file says otherwise (as llama.cpp does)
    config["add_bos_token"] = bool(
        file.meta("tokenizer.ggml.add_bos_token", file.meta("tokenizer.ggml.model") == "llama")
    )
    config["add_eos_token"] = bool(file.meta("tokenizer.ggml.add_eos_token", False))
    config["clean_up_tokenization_spaces"] = False
    context = file.meta("{arch}.context_length", None)
    if context is not None:
        config["model_max_length"] = int(context)
    template = file.meta("tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return config


# -- tokenizer.json -> GGUF metadata ------------------------------------------------------------------------


def _pre_tokenizer_parts(spec: Any) -> list[dict[str, Any]]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [part for sub in spec.get("pretokenizers", []) for part in _pre_tokenizer_parts(sub)]
    return [spec]


def _bpe_pre(path: Path, spec: Any) -> str:
    """The ``tokenizer.ggml.pre`` whose split rule is ``tokenizer.json``'s byte-level pre-tokenizer."""
    parts = _pre_tokenizer_parts(spec)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return DIGIT_SPLIT_PRE[0]
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise NibbleError(
        f"{path}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp counterpart that "
        "nibble knows (GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE, SentencePiece with byte fallback)"
    )


def _token_types(tokenizer: Tokenizer, data: dict[str, Any], vocab: dict[str, int], vocab_size: int):
    """Every embedding row's token and llama.cpp token type."""
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    byte_fallback = bool(data["model"].get("byte_fallback"))
    unk = tokenizer.token_id("unk_token")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        if i in added:
            types[i] = CONTROL if added[i].get("special") else USER_DEFINED
        elif byte_fallback and _BYTE_TOKEN.fullmatch(token):
            types[i] = BYTE
        else:
            types[i] = UNKNOWN if i == unk else NORMAL
    return tokens, types


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's ``tokenizer.*`` keys for ``tokenizer`` (a BPE ``tokenizer.json``), with ``vocab_size`` tokens.

    Raises:
        NibbleError: a tokenizer model other than BPE, a pre-tokenizer llama.cpp has no counterpart for, more
            tokens than ``vocab_size`` embedding rows, or malformed merges.
    """
    source = tokenizer.path / "tokenizer.json"
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise NibbleError(f"{source}: a {model.get('type')} tokenizer; llama.cpp's GGUF holds BPE vocabularies only")
    vocab: dict[str, int] = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise NibbleError(f"{source}: token id {max(vocab.values())} is past the model's {vocab_size} embedding rows")
    tokens, types = _token_types(tokenizer, data, vocab, vocab_size)
    merges = [split_merge(source, m) for m in model.get("merges") or []]
    meta: dict[str, Any] = {}
    if model.get("byte_fallback"):
        # SentencePiece: llama.cpp merges by the score of the merged token, so score tokens by merge rank
        meta["tokenizer.ggml.model"] = "llama"
        scores = [-1e9] * vocab_size  # tokens no merge makes come last
        for rank, (left, right) in reversed(list(enumerate(merges))):  # the first merge making a token wins
            if left + right in vocab:
                scores[vocab[left + right]] = -float(rank)
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.scores"] = scores
        prepend = any(
            p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
            for p in _pre_tokenizer_parts(data.get("pre_tokenizer"))
        ) or "Prepend" in json.dumps(data.get("normalizer"))
        meta["tokenizer.ggml.add_space_prefix"] = prepend
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = _bpe_pre(source, data.get("pre_tokenizer"))
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.add_space_prefix"] = False
    meta["tokenizer.ggml.token_type"] = types
    if merges:
        meta["tokenizer.ggml.merges"] = [f"{left} {right}" for left, right in merges]
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = tokenizer.token_id(f"{name}_token")
        if token_id is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = token_id
    # whether the tokenizer's own post-processor puts BOS before / EOS after a text
    probe, plain = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    start = 1 if probe[:1] == [tokenizer.bos_id] and probe[1 : 1 + len(plain)] == plain else 0
    meta["tokenizer.ggml.add_bos_token"] = start == 1
    meta["tokenizer.ggml.add_eos_token"] = tokenizer.eos_id is not None and probe[start + len(plain) :] == [
        tokenizer.eos_id
    ]
    if tokenizer.chat_template is not None:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta

"""GGUF out: write a model or adapter file llama.cpp loads, and the tokenizer metadata it reads.

``write_gguf`` streams tensors one at a time (each produced, quantized, written, dropped) under a temporary
name beside the target and renames it into place when complete. ``tokenizer_metadata`` turns a
``tokenizer.json`` into llama.cpp's ``tokenizer.ggml.*`` keys.

Facts this relies on (llama.cpp's loader):
- metadata integers are read as uint32, floats as float32; token types and scores are int32/float32 arrays;
- ``tokenizer.ggml.model`` ``gpt2`` is byte-level BPE (tokens spelled in GPT-2's byte alphabet, merges
  ``"a b"``) whose split rule is chosen by ``tokenizer.ggml.pre``; ``llama`` is SentencePiece with byte
  fallback (``<0xXX>`` tokens), whose merges follow the token scores (higher merges first);
- the token list has one entry per embedding row: rows past the tokenizer are ``[PADn]`` tokens of type
  UNUSED; token types are 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from nibble.errors import NibbleError
from nibble.io.files import atomic_file
from nibble.io.gguf import DIGIT_SPLIT_PRE, LLAMA3_SPLIT, QWEN2_SPLIT
from nibble.io.tokenizer import Tokenizer
from nibble.quant.gguf import quantize_blocks, row_bytes

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFTensor:
    """One tensor to write: GGUF ``name``, torch-order ``shape``, ggml type name, and ``produce()`` giving its
    float values (called once, when the tensor is written)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        rows = 1 if len(self.shape) == 1 else int(np.prod(self.shape[:-1]))
        return rows * row_bytes(self.ggml_type, self.shape[-1])


def _encode(tensor: GGUFTensor) -> np.ndarray:
    """The bytes of ``tensor`` in its ggml type."""
    values = tensor.produce().detach().to("cpu", torch.float32)
    if tuple(values.shape) != tuple(tensor.shape):
        raise NibbleError(f"tensor '{tensor.name}' has shape {list(values.shape)}, expected {list(tensor.shape)}")
    if tensor.ggml_type == "F32":
        return values.contiguous().numpy()
    return quantize_blocks(values.reshape(-1, tensor.shape[-1]), tensor.ggml_type).numpy()


def _value_type(key: str, value: Any) -> gguf.GGUFValueType:
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, list) and value:
        return gguf.GGUFValueType.ARRAY
    raise NibbleError(f"GGUF metadata '{key}': cannot store {value!r}")


def write_gguf(
    path: str | Path,
    arch: str,
    metadata: Mapping[str, Any],
    tensors: Iterable[GGUFTensor],
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write a GGUF file: ``general.architecture`` ``arch``, the ``metadata`` keys (bool, int as uint32, float as
    float32, str, or a non-empty list), and ``tensors`` in order, each quantized as its ggml type says.

    The file is written under a temporary name in the same directory, fsynced and renamed onto ``path``
    (:func:`nibble.io.files.atomic_file`), so ``path`` is either absent (or the old file) or complete.

    Raises:
        NibbleError: ``path`` exists (without ``overwrite``) or is a directory, a value that cannot be stored,
            a tensor whose values do not match its declared shape or type, or a failed write (a full disk: one
            line naming the directory and the bytes needed).
    """
    path = Path(path)
    if path.is_dir():
        raise NibbleError(f"{path}: is a directory; --output names the .gguf file to write")
    if path.exists() and not overwrite:
        raise NibbleError(f"{path}: already exists; choose another --output or pass --overwrite")
    tensors = list(tensors)
    with atomic_file(path, sum(t.nbytes for t in tensors)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            _write(writer, metadata, tensors, log)
        finally:
            writer.close()
    return path


# -- tokenizer ------------------------------------------------------------------------------------------


def _write(
    writer: gguf.GGUFWriter, metadata: dict[str, Any], tensors: list[GGUFTensor], log: Callable[[str], None] | None
) -> None:
    for key, value in metadata.items():
        writer.add_key_value(key, value, _value_type(key, value))
    for t in tensors:
        raw = gguf.GGMLQuantizationType[t.ggml_type]
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, t in enumerate(tensors, 1):
        data = _encode(t)
        if data.nbytes != t.nbytes:
            raise NibbleError(f"tensor '{t.name}': {data.nbytes} bytes encoded, {t.nbytes} declared")
        writer.write_tensor_data(data)
        if log is not None:
            log(f"[{i}/{len(tensors)}] {t.name} {t.ggml_type} {list(t.shape)}")
    writer.flush()


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


def _merge_pairs(path: Path, merges: list[Any]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        if len(pair) != 2:
            raise NibbleError(f"{path}: malformed merge {merge!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


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
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    byte_fallback = bool(model.get("byte_fallback"))
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
    merges = _merge_pairs(source, model.get("merges") or [])
    meta: dict[str, Any] = {}
    if byte_fallback:
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

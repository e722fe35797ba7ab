"""A GGUF file's metadata, each value checked to have the type nibble reads it as, and the tokenizer it describes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nibble.errors import NibbleError
from nibble.io.gguf.reader import GGUFContents, read_gguf
from nibble.io.gguf.tokenizer import build_tokenizer, tokenizer_config

_GGUF_MAGIC = b"GGUF"
_REQUIRED = object()

# The type of every metadata value nibble reads, by the end of its key.
_META_KINDS = {
    "_token_id": "id",
    "context_length": "size",
    "embedding_length": "size",
    "head_count": "size",
    "head_count_kv": "size",
    "key_length": "size",
    "value_length": "size",
    "dimension_count": "size",
    "feed_forward_length": "size",
    "block_count": "size",
    "freq_base": "number",
    "layer_norm_rms_epsilon": "number",
    "scaling.factor": "number",
    "add_bos_token": "bool",
    "add_eos_token": "bool",
    "ggml.tokens": "strings",
    "ggml.merges": "strings",
    "ggml.token_type": "ints",
    "ggml.scores": "numbers",
    "architecture": "str",
    "ggml.model": "str",
    "ggml.pre": "str",
    "chat_template": "str",
    "scaling.type": "str",
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_META_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "number": (lambda v: _is_number(v) and v > 0, "a finite positive number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "ints": (lambda v: isinstance(v, list) and all(type(x) is int for x in v), "a list of integers"),
    "numbers": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of finite numbers"),
}


def _checked_meta(path: Path, key: str, value: Any) -> Any:
    """``value`` when it has the type nibble expects for ``key``, else a NibbleError naming the key."""
    kind = next((kind for end, kind in _META_KINDS.items() if key.endswith(end)), None)
    if kind is not None:
        ok, want = _META_CHECKS[kind]
        if not ok(value):
            raise NibbleError(f"{path}: metadata key '{key}' must be {want}, got {repr(value)[:60]}")
    return value


def decimal(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99999997e-07):
    the value the model's own config had before it was stored in 32 bits."""
    return float(str(np.float32(value)))


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _open_reader(path: Path) -> GGUFContents:
    """The parsed file (fields and tensors, as ``gguf.GGUFReader`` gives them), or a NibbleError naming it."""
    if not path.exists():
        raise NibbleError(f"{path}: no such file")
    if not path.is_file():
        raise NibbleError(f"{path}: not a file; pass the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise NibbleError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != _GGUF_MAGIC:
        raise NibbleError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    # memory-maps the file and views every tensor; every size is checked against the file first
    return read_gguf(path)


class GGUFFile:
    """A readable GGUF file: its metadata and the tokenizer the metadata describes (no model checks).

    Raises:
        NibbleError: missing or unreadable file, not a GGUF, truncated or corrupt; later, missing or
            corrupt metadata. Every message is one line naming the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        self.architecture: str = self.meta("general.architecture")

    def meta(self, key: str, default: Any = _REQUIRED) -> Any:
        """Metadata value ``key`` (``{arch}`` filled in); a missing key is ``default``, or a NibbleError."""
        key = key.replace("{arch}", getattr(self, "architecture", ""))
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise NibbleError(f"{self.path}: metadata key '{key}' is missing; the file is incomplete")
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as exc:
            raise NibbleError(f"{self.path}: metadata key '{key}' is corrupt ({exc})") from None
        return _checked_meta(self.path, key, value)

    def tokenizer(self):
        """The tokenizer described by the file's ``tokenizer.ggml.*`` metadata, as a ``tokenizers.Tokenizer``."""
        return build_tokenizer(self)

    def tokenizer_config(self) -> dict[str, Any]:
        """``tokenizer_config.json``: special tokens, whether BOS/EOS are added, the chat template."""
        return tokenizer_config(self)

    def save_tokenizer(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer().save(str(directory / "tokenizer.json"))
        text = json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

"""Tokenizer: tokenizer.json run by the ``tokenizers`` library, configured as transformers configures it.

transformers' ``AutoTokenizer`` reads tokenizer.json and keeps its normalizer, pre-tokenizer and
post-processor (``add_bos_token``/``add_eos_token`` in tokenizer_config.json are ignored when a
tokenizer.json exists); from tokenizer_config.json it takes the named special tokens and adds those
missing from the vocabulary as special tokens. Doing the same here gives the same ids for the same text.
Chat templates render in a bounded jinja2 sandbox (see :mod:`nibble.io.chat_template`).
"""

from __future__ import annotations

import array
import shutil
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nibble.errors import NibbleError
from nibble.io.chat_template import render
from nibble.io.files import read_json_object

_RESTORE = "restore the tokenizer files from the original model"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
_CUT_MARGIN = 8  # tokens tokenized beyond a cut's length, so the cut's own end is never kept
_WINDOW_CHARS, _OVERLAP_CHARS = 1 << 18, 1 << 12  # a long text tokenized in windows (see encode_positions)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _position_type(text: str) -> type:
    """The narrowest integer type that holds every character position of ``text``."""
    return np.int32 if len(text) < 2**31 else np.int64


def _token_text(value: Any) -> str | None:
    """A special token given as a string or as a serialized AddedToken ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Truncated(NamedTuple):
    r"""Texts tokenized and cut (see :meth:`Tokenizer.encode_truncated`): the ``ids`` kept per text, the tokens
    ``beyond`` the cut per text (0: not cut), and whether each text was ``partial``\ly tokenized (cut before
    tokenizing, beyond its end: ``beyond`` counts only the tokens of the start that was tokenized, a lower bound)."""

    ids: list[list[int]]
    beyond: list[int]
    partial: list[bool]

    @property
    def cut(self) -> int:
        """How many texts were cut."""
        return sum(b > 0 for b in self.beyond)


class Tokenizer:
    """A model directory's tokenizer: encode/decode, special-token ids, and chat-template rendering."""

    def __init__(self, path: str | Path):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as BackendTokenizer

        self.path = Path(path)
        tokenizer_file = self.path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise NibbleError(f"{self.path}: no tokenizer.json; copy the model's tokenizer files into this directory")
        try:
            self.backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            raise NibbleError(f"{tokenizer_file}: not a valid tokenizers file ({exc})") from None
        self.backend.no_truncation()
        self.backend.no_padding()
        config_file = self.path / "tokenizer_config.json"
        self.config = read_json_object(config_file, _RESTORE) if config_file.is_file() else {}
        legacy_file = self.path / "special_tokens_map.json"
        legacy = read_json_object(legacy_file, _RESTORE) if legacy_file.is_file() else {}
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_NAMES:
            text = _token_text(self.config.get(name, legacy.get(name)))
            if text is not None:
                self.special_tokens[name] = text

        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if not isinstance(extra, (dict, list)):
            raise NibbleError(f"{config_file}: 'extra_special_tokens' must be a list or an object; {_RESTORE}")
        extra_texts = [t for t in (_token_text(v) for v in (extra.values() if isinstance(extra, dict) else extra)) if t]
        vocab = self.backend.get_vocab(with_added_tokens=True)
        missing = [t for t in [*self.special_tokens.values(), *extra_texts] if t not in vocab]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        split = self.config.get("split_special_tokens", False)
        if not isinstance(split, bool):
            raise NibbleError(f"{config_file}: 'split_special_tokens' must be true or false; {_RESTORE}")
        self.backend.encode_special_tokens = split

    def token_id(self, name: str) -> int | None:
        """The id of a named special token (``"pad_token"``, ``"eos_token"``, ...), or None."""
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def pad_id(self) -> int:
        """The id batches are padded with: the pad token, else the eos token (as training code commonly
        does), else ``pad_token_id`` of a config.json beside the tokenizer, else 0. Padded positions are
        masked, so the choice never changes a result; it only has to be a valid id."""
        for name in ("pad_token", "eos_token"):
            token = self.token_id(name)
            if token is not None:
                return token
        config = self.path / "config.json"
        pad = read_json_object(config, _RESTORE).get("pad_token_id") if config.is_file() else None
        return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < len(self) else 0

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos_token")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def check_fits(self, vocab_size: int, model: str | Path) -> None:
        """Every token id has a row in the embedding of ``model`` (``vocab_size`` rows), checked at load rather
        than as an IndexError in the first step.

        Raises:
            NibbleError: the tokenizer has more tokens than the model embeds.
        """
        if len(self) > vocab_size:
            raise NibbleError(
                f"{self.path / 'tokenizer.json'}: {len(self)} tokens, but {model} embeds {vocab_size} (vocab_size); "
                f"ids from {vocab_size} on have no embedding: use the tokenizer the model was trained with"
            )

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of ``text`` (special tokens as the post-processor adds them), cut to ``max_length``."""
        return self.encode_batch([text], add_special_tokens, max_length)[0]

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids of many texts; truncation keeps the special tokens and cuts the text (from the right)."""
        if max_length is None:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return self.encode_truncated(texts, max_length, add_special_tokens).ids

    @cached_property
    def longest_token(self) -> int:
        """The most characters a token of the vocabulary spells (at least 1)."""
        return max(1, *map(len, self.backend.get_vocab(with_added_tokens=True)))

    def encode_truncated(self, texts: Sequence[str], max_length: int, add_special_tokens: bool = True) -> Truncated:
        """Token ids of many texts cut to ``max_length`` (as :meth:`encode_batch`), with the tokens each cut
        dropped (see :class:`Truncated`).

        Work and memory follow ``max_length``, not the texts: a text is cut to ``_CUT_MARGIN`` tokens beyond
        ``max_length`` of the vocabulary's longest before it is tokenized (a 200 MB row once allocated 4 GiB of
        encodings), and cut twice as long again while that yields too few tokens (a normalizer that drops
        characters). The margin keeps the tokens a cut could change (those at its end) out of the result.
        """
        extra = self.backend.num_special_tokens_to_add(is_pair=False) if add_special_tokens else 0
        out: list[list[int]] = [[] for _ in texts]
        beyond, partial = [0] * len(texts), [False] * len(texts)
        todo, cut = list(range(len(texts))), (max_length + _CUT_MARGIN) * self.longest_token
        self.backend.enable_truncation(max_length)
        try:
            while todo:
                parts = [texts[i][:cut] for i in todo]
                encodings = self.backend.encode_batch(parts, add_special_tokens=add_special_tokens)
                retry = []
                for i, part, e in zip(todo, parts, encodings, strict=True):
                    over = sum(len(o.ids) - extra for o in e.overflowing)
                    if len(part) < len(texts[i]) and over < _CUT_MARGIN:
                        retry.append(i)
                    else:
                        out[i], partial[i] = e.ids, len(part) < len(texts[i])
                        beyond[i] = max(over, int(partial[i]))
                todo, cut = retry, cut * 2
        finally:
            self.backend.no_truncation()
        return Truncated(out, beyond, partial)

    def encode_positions(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (uint32) of ``text`` without special tokens, and the character each token starts at.

        A long text is tokenized in windows of ``_WINDOW_CHARS``, so memory follows the ids, not the library's
        ~80 bytes of encoding per token (a 20 MB row once took 7 GB): a window's tokens are kept up to a token
        start ``_OVERLAP_CHARS`` before its end, where the next window begins, and the next window must give the
        same tokens over the overlap (up to a guard before the earlier window's end). Where it does not (a
        tokenizer whose tokens reach further), the whole text is tokenized at once.
        """
        if len(text) > _WINDOW_CHARS:
            windowed = self._windowed(text)
            if windowed is not None:
                return windowed
        encoding = self.backend.encode(text, add_special_tokens=False)
        return np.array(encoding.ids, np.uint32), np.array([o[0] for o in encoding.offsets], _position_type(text))

    def _windowed(self, text: str) -> tuple[np.ndarray, np.ndarray] | None:
        kind = _position_type(text)
        all_ids, all_starts = array.array("I"), array.array("i" if kind is np.int32 else "q")  # (grown in place)
        pos, check = 0, None  # check: the earlier window's tokens the next one must repeat
        while True:
            end = min(len(text), pos + _WINDOW_CHARS)
            encoding = self.backend.encode(text[pos:end], add_special_tokens=False)
            ids = np.array(encoding.ids, np.uint32)
            starts = np.array([o[0] for o in encoding.offsets], kind) + pos
            del encoding
            if check is not None:
                n = len(check[0])
                if not (np.array_equal(ids[:n], check[0]) and np.array_equal(starts[:n], check[1])):
                    return None
            if end == len(text):
                all_ids.frombytes(ids.tobytes())
                all_starts.frombytes(starts.tobytes())
                return np.frombuffer(all_ids, np.uint32), np.frombuffer(all_starts, kind)
            cut = int(np.searchsorted(starts, end - _OVERLAP_CHARS))
            while 0 < cut < len(starts) and starts[cut] == starts[cut - 1]:  # (tokens of one character)
                cut += 1
            guard = int(np.searchsorted(starts, end - _OVERLAP_CHARS // 4))
            if not 0 < cut < guard:  # no token starts in the overlap (one very long token)
                return None
            all_ids.frombytes(ids[:cut].tobytes())
            all_starts.frombytes(starts[:cut].tobytes())
            check, pos = (ids[cut:guard], starts[cut:guard]), int(starts[cut])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template_and_file(self) -> tuple[str | None, Path]:
        """The default chat template (chat_template.jinja, chat_template.json, or tokenizer_config.json) and
        the file it came from."""
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                return jinja_file.read_text(encoding="utf-8"), jinja_file
            except (OSError, UnicodeDecodeError) as exc:
                raise NibbleError(f"{jinja_file}: cannot read the chat template ({exc}); {_RESTORE}") from None
        json_file = self.path / "chat_template.json"
        source = json_file if json_file.is_file() else self.path / "tokenizer_config.json"
        template = read_json_object(json_file, _RESTORE).get("chat_template") if json_file.is_file() else None
        template = template if template is not None else self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return (template if isinstance(template, str) else None), source

    @cached_property
    def chat_template(self) -> str | None:
        """The default chat template, or None (a caller may set another)."""
        return self._template_and_file[0]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        generation_spans: list[tuple[int, int]] | None = None,
        **variables: Any,
    ) -> str:
        """Render ``messages`` with the chat template (the text; tokenize it with ``add_special_tokens=False``);
        ``variables`` (``tools``, ``enable_thinking``, ...) reach the template as transformers passes them, and the
        character spans of its ``{% generation %}`` blocks are appended to ``generation_spans`` when given.

        Raises:
            NibbleError: no template, or one that fails, breaks the sandbox or exceeds its bounds (see
                :mod:`nibble.io.chat_template`); names the file the template came from.
        """
        template = self.chat_template
        if template is None:
            raise NibbleError(f"{self.path}: the tokenizer has no chat_template; use a model with one")
        stored, file = self._template_and_file
        source = str(file) if template == stored else "the built-in ChatML template"
        context = {"tools": None, "documents": None, **self.special_tokens, **variables}
        context["add_generation_prompt"] = add_generation_prompt
        return render(template, source, messages, generation_spans, **context)

    def save(self, directory: str | Path) -> None:
        """Copy the tokenizer files into ``directory`` (as loaded: the same files give the same ids)."""
        directory = Path(directory)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, directory / name)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a model directory (tokenizer.json + tokenizer_config.json)."""
    return Tokenizer(path)

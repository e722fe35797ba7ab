"""The metadata files of a trained adapter or model: ``nibble.json`` (how the base was loaded and the data
read) and ``label_map.json`` (a classifier's labels in id order)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nibble.errors import NibbleError
from nibble.io.files import read_json_object, write_json
from nibble.quant.spec import QuantSpec

RUN_INFO = "nibble.json"
LABEL_MAP = "label_map.json"
_RESTORE = "restore it from the training output"

Label = int | str


def is_label(value: Any) -> bool:
    """Whether ``value`` can be a class label: an integer >= 0 or a string."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or isinstance(value, str)


@dataclass
class LabelMap:
    """The labels in id order and whether rows carry several labels each."""

    labels: list[Label]
    multi_label: bool = False

    def __post_init__(self) -> None:
        self._ids = {label: i for i, label in enumerate(self.labels)}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def id_of(self, label: Label) -> int | None:
        return self._ids.get(label)

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "multi_label": self.multi_label}

    @classmethod
    def from_json(cls, data: Any, source: str) -> LabelMap:
        labels = data.get("labels") if isinstance(data, dict) else None
        ok = isinstance(labels, list) and len(labels) >= 1
        if not ok or not all(is_label(x) for x in labels) or len({type(x) for x in labels}) != 1:
            raise NibbleError(f"{source}: 'labels' must be a non-empty list of integers or strings")
        if len(set(labels)) != len(labels):
            raise NibbleError(f"{source}: 'labels' names a label twice; each class has one label")
        multi = data.get("multi_label", False)
        if not isinstance(multi, bool):
            raise NibbleError(f"{source}: 'multi_label' must be true or false, got {multi!r}")
        return cls(list(labels), multi)

    def save(self, path: str | Path) -> None:
        """Write the map as JSON to ``path`` (``DIR/label_map.json`` beside an adapter or model)."""
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """Read a map written by :meth:`save`."""
        return cls.from_json(read_json_object(path, "the adapter or model directory needs its label map"), str(path))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _gguf_base(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("file"), str) and _count(value.get("bytes"))


# What each field of nibble.json must hold where it is not null (dtype and pooling are checked by value).
_TYPES: dict[str, tuple[Any, str]] = {
    **{
        key: (lambda v: isinstance(v, str), "a string")
        for key in (
            *("task", "method", "dtype", "pooling", "text_column", "label_column", "columns", "thinking"),
            "train_turns",
            *("merged_from", "base_model", "base_fingerprint"),
        )
    },
    "max_seq_len": (lambda v: _count(v) and v > 0, "an integer > 0"),
    "step": (_count, "an integer >= 0"),
    "gguf_base": (_gguf_base, 'an object {"file": name, "bytes": size}'),
}


@dataclass
class RunInfo:
    """``nibble.json``: what eval, predict, generate and merge need to rebuild a trained model the way training
    built it. ``quant`` is the 4-bit format of the frozen base (None: a dense base); with the ``gguf`` format,
    ``gguf_base`` names the .gguf file whose blocks it was (``{"file": name, "bytes": size}``); ``base_model`` the
    model the run started from as the user named it (a directory or a .gguf file; adapter_config.json names the
    loadable HF directory instead), ``base_fingerprint`` that model's content (see
    :func:`nibble.io.files.model_fingerprint` of its HF directory); ``step`` the optimizer step the weights come
    from."""

    task: str | None = None
    method: str | None = None
    quant: QuantSpec | None = None
    dtype: str = "float32"
    pooling: str = "last"
    max_seq_len: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    columns: str | None = None
    thinking: str | None = None
    train_turns: str | None = None
    merged_from: str | None = None
    base_model: str | None = None
    step: int | None = None
    gguf_base: dict[str, Any] | None = None
    base_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("quant", "extra")}
        return {**self.extra, **data, "quant": self.quant.to_json() if self.quant else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> RunInfo:
        """Read the object; keys nibble does not know are kept in ``extra``. Files written before ``quant``
        existed name the format in ``quantize`` with ``blocksize``/``group_size``/``double_quant`` beside it."""
        data = dict(data)
        legacy = {k: data.pop(k) for k in ("quantize", "blocksize", "group_size", "double_quant") if k in data}
        quant = data.pop("quant", None)
        if quant is None and legacy.get("quantize"):
            quant = {"format": legacy.pop("quantize"), **{k: v for k, v in legacy.items() if k != "quantize"}}
        known = {f.name for f in fields(cls)} - {"quant", "extra"}
        for key, value in data.items():
            if key in _TYPES and value is not None and not _TYPES[key][0](value):
                raise NibbleError(f"{source}: '{key}' must be {_TYPES[key][1]}, got {value!r:.80}; {_RESTORE}")
        info = cls(**{k: v for k, v in data.items() if k in known})
        for key, allowed in (("dtype", ("float32", "bfloat16", "float16")), ("pooling", ("last", "mean"))):
            if getattr(info, key) not in allowed:
                raise NibbleError(f"{source}: '{key}' must be one of {', '.join(allowed)}, got {getattr(info, key)!r}")
        info.quant = QuantSpec.from_json(quant, source) if quant is not None else None
        info.extra = {k: v for k, v in data.items() if k not in known}
        return info

    def save(self, path: str | Path) -> None:
        """Write the object as JSON to ``path`` (``DIR/nibble.json``)."""
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> RunInfo:
        """Read a file written by :meth:`save`; an empty RunInfo when there is none (a PEFT adapter)."""
        path = Path(path)
        if not path.is_file():
            return cls()
        return cls.from_json(read_json_object(path, _RESTORE), str(path))

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


__all__ = ["LABEL_MAP", "RUN_INFO", "Label", "LabelMap", "RunInfo", "is_label"]

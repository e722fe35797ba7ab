"""GGUF out: ``write_gguf`` writes a model or adapter file llama.cpp loads, streaming the tensors one at a time
(each produced, quantized, written, dropped) under a temporary name beside the target, renamed into place when
complete.

llama.cpp's loader reads metadata integers as uint32 and floats as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from nibble.errors import NibbleError
from nibble.io.files import atomic_file
from nibble.quant.gguf import quantize_blocks, row_bytes


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

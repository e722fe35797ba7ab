"""A bounded GGUF reader: the header, metadata and tensor table checked against the file before anything
is allocated, metadata kept compact, tensor data left in the memory map.

``read_gguf(path)`` returns the same things ``gguf.GGUFReader`` does -- ``fields`` (name -> a field whose
``contents()`` is the value) and ``tensors`` (``gguf.ReaderTensor`` with ``data`` a view of the mapped file)
-- but every count a file states is checked against the bytes left in it before it is used (an array that
claims 2**40 elements in a 1 KB file fails at once), and metadata arrays are kept as offsets into the map
rather than as one numpy object per element. The ``gguf`` package's reader holds about 1 KB per metadata
array element: opening SmolLM2-135M (147k elements) peaked at 158 MiB of traced memory and took 17.2 s, this
reader 10.2 MiB and 1.5 s (``benchmarks/bench_guards.py``, same run, a loaded 2-core machine).

GGUF layout (v2/v3, little- or big-endian): magic ``GGUF``, version u32, tensor count u64, metadata count
u64; each metadata entry is a string key, a u32 value type and the value (scalars; strings as u64 length +
UTF-8 bytes; arrays as item type u32, count u64, items); each tensor entry is a string name, u32 dimension
count (at most 4), u64 dimensions (fastest first), u32 ggml type and u64 offset; tensor data starts at the
next multiple of ``general.alignment`` (default 32) after the table.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

from nibble.errors import NibbleError

VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_NESTING = 4  # arrays of arrays of ...; real files use none
MAX_ELEMENTS_SMALL_FILE = 1 << 20  # metadata array elements any file may hold (vocabulary-only files need ~0.6M)
DEFAULT_ALIGNMENT = 32
# value type -> numpy scalar type (8: string, 9: array)
_SCALARS: dict[int, type[np.generic]] = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
# ggml types whose data the gguf package views as typed arrays rather than bytes
_TYPED = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Corrupt(Exception):
    """A structural problem at a byte offset (turned into one NibbleError by :func:`read_gguf`)."""


@dataclass
class Field:
    """One metadata value: ``contents()`` decodes it as ``gguf.ReaderField.contents()`` does (a number,
    bool, str, or a list of them).

    Strings stay undecoded ``(start, length)`` pairs until asked for, so a bad byte in a key nobody reads
    fails nothing; a string that is not UTF-8 raises UnicodeDecodeError when read.
    """

    name: str
    value_type: int
    _value: Any
    _data: np.ndarray

    def contents(self) -> Any:
        return self._decode(self.value_type, self._value)

    def _decode(self, kind: int, value: Any) -> Any:
        if kind == _STRING:
            start, length = value
            return self._data[start : start + length].tobytes().decode("utf-8")
        if kind == _ARRAY:
            item_type, items = value
            if item_type in _SCALARS:
                return items.tolist()
            if item_type == _STRING:
                starts, lengths = items
                return [self._data[s : s + n].tobytes().decode("utf-8") for s, n in zip(starts, lengths, strict=True)]
            return [self._decode(_ARRAY, inner) for inner in items]
        return value


class GGUFContents:
    """The parsed file: ``fields`` (metadata by key, in file order) and ``tensors`` (in file order)."""

    def __init__(self, path: Path, data: np.memmap, fields: dict[str, Field], tensors: list[ReaderTensor]):
        self.path, self.data, self.fields, self.tensors = path, data, fields, tensors


class _Cursor:
    """Reads GGUF values from the mapped bytes, checking every length against what is left."""

    def __init__(self, data: np.ndarray, order: str):
        self.data, self.order, self.pos, self.size = data, order, 0, len(data)
        self.elements = 0  # metadata array elements so far

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise _Corrupt(f"{what} needs {n} bytes at offset {self.pos} but the file has {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> tuple[int, int]:
        length = self.unpack("Q", what)
        self.need(length, what)
        start = self.pos
        self.pos += length
        return start, length

    def text(self, what: str) -> str:
        start, length = self.string(what)
        try:
            return self.data[start : start + length].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at offset {start} is not UTF-8") from None

    def scalar(self, kind: int, what: str) -> Any:
        dtype = np.dtype(_SCALARS[kind]).newbyteorder(self.order)
        self.need(dtype.itemsize, what)
        value = np.frombuffer(self.data, dtype, 1, self.pos)[0].item()
        self.pos += dtype.itemsize
        return value

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind, what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise _Corrupt(f"{what} has unknown value type {kind}")
        if depth >= MAX_NESTING:
            raise _Corrupt(f"{what} nests arrays more than {MAX_NESTING} deep")
        item_type = self.unpack("I", what)
        count = self.unpack("Q", what)
        if item_type in _SCALARS:
            smallest = np.dtype(_SCALARS[item_type]).itemsize
        elif item_type in (_STRING, _ARRAY):
            smallest = 8 if item_type == _STRING else 12  # a string's length; an array's type and count
        else:
            raise _Corrupt(f"{what} is an array of unknown value type {item_type}")
        self.need(count * smallest, f"{what} ({count} elements)")
        self.elements += count
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type]).newbyteorder(self.order)
            items = np.frombuffer(self.data, dtype, count, self.pos)
            self.pos += count * dtype.itemsize
            return item_type, items
        if item_type == _STRING:
            starts = np.empty(count, np.int64)
            lengths = np.empty(count, np.int64)
            for i in range(count):
                starts[i], lengths[i] = self.string(what)
            return item_type, (starts, lengths)
        return item_type, [self.value(_ARRAY, what, depth + 1) for _ in range(count)]


def read_gguf(path: str | Path) -> GGUFContents:
    """Parse a GGUF file's header, metadata and tensor table, checking every stated size against the file.

    Raises:
        NibbleError: a missing or unreadable file, not a GGUF, an unsupported version, or any count,
            length, type, shape or offset the file cannot hold; one line naming the file and the offset.
    """
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as exc:
        raise NibbleError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return _parse(path, data)
    except _Corrupt as exc:
        raise NibbleError(f"{path}: truncated or corrupt GGUF file ({exc}); download it again") from None


def _parse(path: Path, data: np.ndarray) -> GGUFContents:
    if data[:4].tobytes() != b"GGUF":
        raise NibbleError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    cursor = _Cursor(data, "<")
    cursor.pos = 4
    version = cursor.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cursor.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in VERSIONS:
        raise NibbleError(f"{path}: GGUF version {version} is not supported (versions {VERSIONS} are)")
    tensor_count = cursor.unpack("Q", "the tensor count")
    kv_count = cursor.unpack("Q", "the metadata count")
    cursor.need(kv_count * 13, f"{kv_count} metadata entries")  # key length 8 + type 4 + at least 1 byte
    fields: dict[str, Field] = {}
    for _ in range(kv_count):
        key = cursor.text("a metadata key")
        kind = cursor.unpack("I", f"metadata '{key}'")
        if key in fields:
            raise _Corrupt(f"metadata key '{key}' appears twice")
        fields[key] = Field(key, kind, cursor.value(kind, f"metadata '{key}'"), data)
    # Reading an array makes a Python list (~40-60 bytes per element): bound the elements by the file's size.
    budget = max(MAX_ELEMENTS_SMALL_FILE, len(data) // 8)
    if cursor.elements > budget:
        raise _Corrupt(f"metadata arrays hold {cursor.elements} elements, more than {budget} for a file this size")
    cursor.need(tensor_count * 24, f"{tensor_count} tensor entries")  # name length 8 + dims 4 + type 4 + offset 8
    table = []
    for _ in range(tensor_count):
        name = cursor.text("a tensor name")
        n_dims = cursor.unpack("I", f"tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [cursor.unpack("Q", f"tensor '{name}'") for _ in range(n_dims)]
        raw_type = cursor.unpack("I", f"tensor '{name}'")
        offset = cursor.unpack("Q", f"tensor '{name}'")
        table.append((name, dims, raw_type, offset))
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        alignment = fields["general.alignment"].contents()
        if fields["general.alignment"].value_type != 4 or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment must be a power of two stored as u32, got {alignment!r}")
    data_start = -(-cursor.pos // alignment) * alignment
    return GGUFContents(path, data, fields, _tensors(table, data, data_start, cursor.order))


def _tensors(table: list, data: np.ndarray, data_start: int, order: str) -> list[ReaderTensor]:
    tensors: list[ReaderTensor] = []
    names: set[str] = set()
    for name, dims, raw_type, offset in table:
        if name in names:
            raise _Corrupt(f"tensor '{name}' appears twice")
        names.add(name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor '{name}' has unknown type {raw_type}") from None
        n_elements = math.prod(dims)
        if dims[0] % block:
            raise _Corrupt(f"tensor '{name}' rows of {dims[0]} are not whole {ggml_type.name} blocks of {block}")
        n_bytes = n_elements // block * type_size
        start = data_start + offset
        if start + n_bytes > len(data):
            raise _Corrupt(f"tensor '{name}' needs bytes {start}..{start + n_bytes} but the file has {len(data)}")
        np_dims = tuple(reversed(dims))
        if ggml_type in _TYPED:
            dtype = np.dtype(_TYPED[ggml_type]).newbyteorder(order)
            count = n_elements
        else:
            dtype, count = np.dtype(np.uint8), n_bytes
            np_dims = quant_shape_to_byte_shape(np_dims, ggml_type)
        view = data[start : start + count * dtype.itemsize].view(dtype).reshape(np_dims)
        shape = np.array(dims, dtype=np.uint64)
        tensors.append(ReaderTensor(name, ggml_type, shape, n_elements, n_bytes, start, view, None))
    return tensors

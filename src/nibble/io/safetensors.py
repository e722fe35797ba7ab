"""safetensors without surprises: a validating, memory-mapped, tensor-by-tensor reader, an atomic writer, and a
streaming one.

The header of every file is parsed and checked when a checkpoint is opened (dtype, shape, byte ranges,
file length), so a garbled or truncated file fails at once with one line naming it. Tensors are then
read one at a time through a private memory map, converted chunk by chunk into a fresh tensor of the
requested dtype, and the mapped pages are dropped as soon as they are copied: reading a checkpoint never
holds more than the tensor being built plus one chunk.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nibble.errors import NibbleError
from nibble.io.files import atomic_file, read_json_object

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A header larger than this is not a real one (the format's own reader uses the same bound).
_MAX_HEADER = 100 << 20
# Bytes converted per step: large enough to run at memory speed, small enough not to matter for peak memory.
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    path: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class SafetensorsFile:
    """One ``.safetensors`` file whose header has been read and validated; tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor; float tensors are converted to ``dtype`` when given."""
        info = self.tensors.get(name)
        if info is None:
            raise NibbleError(f"{self.path}: has no tensor '{name}'")
        return _read_tensor(info, dtype)


class Checkpoint(Mapping[str, TensorInfo]):
    """The tensors of a checkpoint (one file or the shards of an index), by name, read one at a time.

    As a mapping it gives each tensor's :class:`TensorInfo`; :meth:`get_tensor` reads the data.
    """

    def __init__(self, files: list[SafetensorsFile], source: Path):
        self.files = files
        self.source = source
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in self._infos:
                    raise NibbleError(f"{f.path}: tensor '{name}' is also in {self._infos[name].path}")
                self._infos[name] = info

    def __getitem__(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """The :class:`TensorInfo` of ``name``; a missing tensor is a NibbleError naming the checkpoint."""
        if name not in self._infos:
            raise NibbleError(f"{self.source}: missing tensor '{name}'")
        return self._infos[name]

    def get_tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Read tensor ``name`` (float tensors converted to ``dtype`` when given) into a new tensor on ``device``
        (the CPU by default). Off the CPU the tensor crosses as stored (a bf16 tensor moves half the bytes of its
        fp32 conversion) and is converted there, so the host holds one stored tensor at a time."""
        info = self.info(name)
        if device is None or device.type == "cpu":
            return _read_tensor(info, dtype)
        tensor = _read_tensor(info, None).to(device)
        return tensor.to(dtype) if dtype is not None and info.is_float else tensor

    def items_stream(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in file order, one at a time (the caller drops each before the next is read)."""
        for f in self.files:
            for name, info in f.tensors.items():
                yield name, _read_tensor(info, dtype)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint: a model directory, a ``.safetensors`` file or a ``*.safetensors.index.json``.

    A directory is read through ``model.safetensors.index.json`` when present, else ``model.safetensors``,
    else every ``*.safetensors`` file in it. Headers are validated now; tensors are read later.

    Raises:
        NibbleError: missing path, no safetensors file, a garbled index or header, a truncated file,
            a shard named by the index that is missing or lacks the tensors the index assigns to it.
    """
    path = Path(path)
    if not path.exists():
        raise NibbleError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _read_index(path)
        return Checkpoint([SafetensorsFile(path)], path)
    if (path / INDEX_NAME).is_file():
        return _read_index(path / INDEX_NAME)
    if (path / SINGLE_NAME).is_file():
        return Checkpoint([SafetensorsFile(path / SINGLE_NAME)], path)
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return Checkpoint([SafetensorsFile(p) for p in files], path)
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise NibbleError(
            f"{path}: holds only pickle weights (*.bin/*.pt), which nibble never reads; "
            "re-save the model as safetensors (save_pretrained(..., safe_serialization=True))"
        )
    raise NibbleError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or other *.safetensors file in this directory")


def load_file(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one small safetensors file (adapters, optimizer state) as a dict of CPU tensors."""
    f = SafetensorsFile(path)
    return {name: _read_tensor(info, dtype) for name, info in f.tensors.items()}


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` as safetensors to a temporary name beside ``path``, fsync, then rename onto ``path``.

    A crash leaves either the old file or the complete new one, never a partial file under ``path``.
    Tensors that share storage (tied weights) are written as separate copies.

    Raises:
        NibbleError: a value that is not a tensor, metadata that is not str -> str, or a failed write (a full
            disk: naming the directory and the bytes needed), after which ``path`` is as it was.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise NibbleError(f"{path}: safetensors metadata must map str to str")
    prepared: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.device]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise NibbleError(f"{path}: '{name}' is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu")
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.device))
        prepared[name] = tensor.contiguous()
    needed = sum(t.numel() * t.element_size() for t in prepared.values())
    with atomic_file(path, needed) as tmp:
        try:
            save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)
        except Exception as exc:  # safetensors reports I/O failures as SafetensorError "... (os error N)"
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
    return path


def write_streamed(
    path: str | Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, produce: Callable[[str], torch.Tensor]
) -> None:
    """Write one safetensors file (inside a staged directory) whose tensors are produced one at a time by
    ``produce(name)``: the header is built from the known ``shapes`` first, so peak memory is a single tensor
    rather than the whole model."""
    code = next(name for name, known in DTYPES.items() if known == dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape in shapes.items():
            tensor = produce(name)
            assert tensor.shape == shape and tensor.dtype == dtype
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def check_fit(
    targets: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    fix: str,
    *,
    same_dtype: bool = False,
) -> None:
    """Check that ``tensors`` are exactly what ``targets`` (what the run builds) hold: the same names and shapes,
    the same dtypes where ``same_dtype``, and finite values, before anything uses them.

    Raises:
        NibbleError: a missing or unexpected tensor (followed by ``fix``), another shape or dtype, or a NaN or
            infinity, naming ``source`` and the tensor.
    """
    missing = sorted(set(targets) - set(tensors))
    unexpected = sorted(set(tensors) - set(targets))
    if missing:
        raise NibbleError(f"{source}: missing tensor '{missing[0]}'; {fix}")
    if unexpected:
        raise NibbleError(f"{source}: unexpected tensor '{unexpected[0]}'; {fix}")
    for name, target in targets.items():
        value = tensors[name]
        if value.shape != target.shape:
            raise NibbleError(
                f"{source}: '{name}' has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}; {fix}"
            )
        if same_dtype and value.dtype != target.dtype:
            raise NibbleError(f"{source}: '{name}' is {value.dtype}, the run needs {target.dtype}; {fix}")
        if target.is_floating_point() and not value.is_floating_point():
            raise NibbleError(f"{source}: '{name}' is {value.dtype}, not a floating-point tensor; the file is damaged")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NibbleError(f"{source}: '{name}' holds NaN or infinite values; the file is damaged")


def copy_into(
    targets: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    source: str,
    fix: str,
    *,
    same_dtype: bool = False,
) -> None:
    """Copy ``tensors`` into ``targets`` (parameters, by name) once :func:`check_fit` holds.

    Raises:
        NibbleError: see :func:`check_fit`.
    """
    check_fit(targets, tensors, source, fix, same_dtype=same_dtype)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])


def _read_index(index_path: Path) -> Checkpoint:
    index = read_json_object(index_path, "not a valid safetensors index; save the model again")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise NibbleError(f"{index_path}: not a valid safetensors index ('weight_map' must map tensor names to files)")
    files: dict[str, SafetensorsFile] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise NibbleError(f"{index_path}: shard '{shard}' is missing from {index_path.parent}")
        files[shard] = SafetensorsFile(shard_path)
    for name, shard in weight_map.items():
        if name not in files[shard].tensors:
            raise NibbleError(f"{index_path}: tensor '{name}' is assigned to '{shard}', which does not hold it")
    return Checkpoint(list(files.values()), index_path.parent)


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of ``path``: every tensor's dtype, shape and byte range."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise NibbleError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER):
                raise NibbleError(
                    f"{path}: header claims {header_len} bytes but the file holds {size}; "
                    "the file is truncated or not safetensors"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise NibbleError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise NibbleError(f"{path}: garbled safetensors header ({exc}); the file is corrupt") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    # File order (by offset) is the order tensors are streamed in.
    return dict(sorted(tensors.items(), key=lambda kv: kv[1].start)), metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        shape = tuple(shape)
        if not all(isinstance(s, int) and s >= 0 for s in shape) or not (isinstance(begin, int) and begin >= 0):
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise NibbleError(f"{path}: garbled header entry for tensor '{name}'; the file is corrupt") from None
    if dtype not in DTYPES:
        raise NibbleError(f"{path}: tensor '{name}' has dtype {dtype}, which nibble does not read")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if not isinstance(end, int) or end - begin != expected:
        raise NibbleError(
            f"{path}: tensor '{name}' spans bytes {begin}..{end} but {dtype}{list(shape)} needs {expected} bytes"
        )
    if end > data_size:
        raise NibbleError(
            f"{path}: truncated: tensor '{name}' ends at data byte {end} but the file holds only {data_size}; "
            "copy or save the file again"
        )
    return TensorInfo(name, dtype, shape, data_start + begin, data_start + end, path)


def _read_tensor(info: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
    src_dtype = DTYPES[info.dtype]
    target = dtype if dtype is not None and info.is_float else src_dtype
    out = torch.empty(info.shape, dtype=target)
    if info.numel == 0:
        return out
    itemsize = src_dtype.itemsize
    flat = out.view(-1)
    step = max(_CHUNK_BYTES // itemsize, 1)
    try:
        with open(info.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < info.end:
                raise NibbleError(f"{info.path}: truncated while reading tensor '{info.name}'")
            # A private (copy-on-write) map is writable, which torch.frombuffer wants; nothing is ever written.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
                for i in range(0, info.numel, step):
                    count = min(step, info.numel - i)
                    offset = info.start + i * itemsize
                    if offset % itemsize:  # unaligned data: copy the bytes to an aligned buffer first
                        raw = torch.frombuffer(mm, dtype=torch.uint8, count=count * itemsize, offset=offset)
                        piece = raw.clone().view(src_dtype)
                        del raw
                    else:
                        piece = torch.frombuffer(mm, dtype=src_dtype, count=count, offset=offset)
                    flat[i : i + count].copy_(piece)
                    del piece
                    _release(mm, offset, count * itemsize)
    except OSError as exc:
        raise NibbleError(f"{info.path}: cannot read tensor '{info.name}' ({exc.strerror})") from None
    return out


def _release(mm: mmap.mmap, offset: int, length: int) -> None:
    """Drop the mapped pages of bytes already copied, so they stop counting toward resident memory."""
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset - offset % mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

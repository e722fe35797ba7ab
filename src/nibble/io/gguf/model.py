"""A GGUF file of a supported decoder, validated when opened: its HF config, its tensors under HF names (as
floats, or a projection in its own blocks), and the file a converted directory came from.

GGUF lists dimensions fastest-first, so a tensor's torch shape is its GGUF shape reversed; quantized types are
dequantized to fp32 by the ``gguf`` package.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from nibble.errors import NibbleError
from nibble.io.files import read_json_object
from nibble.io.gguf.config import hf_config
from nibble.io.gguf.metadata import GGUFFile
from nibble.io.gguf.names import (
    ARCHITECTURES,
    PROJECTION,
    Geometry,
    Link,
    check_links,
    is_rotary_permuted,
    links,
    unpermute_rotary,
)
from nibble.io.safetensors import Checkpoint, TensorInfo
from nibble.quant.gguf import NATIVE_TYPES, GGUFWeight

# Written into a converted directory: the GGUF file it came from (for bases that keep the file's own blocks).
SOURCE_NAME = "gguf_source.json"
# Architectures whose projections a GGUF-native base keeps in the file's own blocks.
NATIVE_ARCHITECTURES = ("llama", "qwen2", "qwen3")


class GGUFModel(GGUFFile):
    """A validated GGUF file of a supported decoder: HF config, HF-named tensors and tokenizer, read on demand.

    Raises:
        NibbleError: everything :class:`GGUFFile` rejects, an architecture nibble does not read (see ``ARCHITECTURES``),
            missing metadata, missing/unknown/misshapen tensors, or a tensor type the gguf package cannot
            dequantize -- all found when the file is opened, before anything is written.
    """

    def __init__(self, path: str | Path):
        super().__init__(path)
        if self.architecture not in ARCHITECTURES:
            raise NibbleError(
                f"{self.path}: architecture '{self.architecture}' is not supported; "
                f"nibble converts {', '.join(ARCHITECTURES)} GGUF files"
            )
        self._plan = self._plan_tensors()

    @cached_property
    def config(self) -> dict[str, Any]:
        """The model's HF ``config.json`` as a dict (see :func:`nibble.io.gguf.config.hf_config`)."""
        return hf_config(self)

    @cached_property
    def gguf_tensors(self) -> dict[str, Any]:
        """The file's tensors by GGUF name (``gguf.ReaderTensor``, data left in the memory map)."""
        return {t.name: t for t in self.reader.tensors}

    def gguf_tensor(self, name: str):
        """The file's tensor ``name`` (a GGUF name).

        Raises:
            NibbleError: the file has no such tensor.
        """
        tensor = self.gguf_tensors.get(name)
        if tensor is None:
            raise NibbleError(f"{self.path}: missing tensor '{name}'; the file is incomplete")
        return tensor

    def _plan_tensors(self) -> dict[str, Link]:
        """HF name -> its link to the file's tensors, every tensor checked against the config."""
        geometry = Geometry.of(self.config, self.architecture)
        check_links(geometry, str(self.path))
        plan = {link.hf: link for link in links(geometry)}
        expected = {name: shape for link in plan.values() for name, shape in link.gguf}
        for name in self.gguf_tensors:
            if name not in expected and name != "rope_freqs.weight":  # read into the config, not a weight
                raise NibbleError(
                    f"{self.path}: unexpected tensor '{name}' for a {self.config['num_hidden_layers']}-layer "
                    f"{self.architecture} model; the file's metadata and tensors disagree or it holds parts nibble "
                    "does not support"
                )
        for name, shape in expected.items():
            tensor = self.gguf_tensor(name)
            actual = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            if actual != shape:
                raise NibbleError(f"{self.path}: tensor '{name}' has shape {list(actual)}, expected {list(shape)}")
            _check_dequantizable(self.path, tensor)
        return plan

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> torch shape of every tensor the model has, known without reading tensor data."""
        return {hf: link.shape for hf, link in self._plan.items()}

    def tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor by HF name, dequantized to fp32 (then cast to ``dtype``), in HF's layout."""
        link = self._plan[hf_name]
        parts = []
        for name, shape in link.gguf:
            gguf_tensor = self.gguf_tensor(name)
            values = gguf.quants.dequantize(gguf_tensor.data, gguf_tensor.tensor_type)
            # F32 data comes back as a view of the read-only file map: copy only then
            parts.append(torch.from_numpy(np.require(values, np.float32, ["C", "W"])).reshape(shape))
        return link.to_hf(*parts).to(dtype)

    def quantized(self, hf_name: str) -> GGUFWeight:
        """A 2-D weight by HF name in the file's own block type (q/k rows back in HF order; no value changes).

        Raises:
            NibbleError: an architecture whose layout changes values or merges tensors (kept blocks exist for
                llama, qwen2 and qwen3), or a tensor stored in a type nibble does not keep as it is (see
                ``NATIVE_TYPES``).
        """
        if self.architecture not in NATIVE_ARCHITECTURES:
            raise NibbleError(
                f"{self.path}: a GGUF-native base keeps the blocks of {', '.join(NATIVE_ARCHITECTURES)} files; "
                f"this is {self.architecture}: use --quant-format nf4 or int4 for it"
            )
        ((name, shape),) = self._plan[hf_name].gguf
        gguf_tensor = self.gguf_tensor(name)
        kind = gguf_tensor.tensor_type.name
        if kind not in NATIVE_TYPES:
            raise NibbleError(
                f"{self.path}: tensor '{name}' is {kind}, which a GGUF-native base cannot keep (it keeps "
                f"{', '.join(NATIVE_TYPES)}); use --quant-format nf4 or int4 for this file"
            )
        data = np.ascontiguousarray(gguf_tensor.data).view(np.uint8).reshape(shape[0], -1)
        weight = GGUFWeight(torch.from_numpy(data.copy()), kind, shape[1])
        if is_rotary_permuted(self.architecture, name):
            rows = torch.arange(shape[0]).unsqueeze(1)
            weight = weight.select_rows(unpermute_rotary(rows, self._rotary_heads(name))[:, 0])
        return weight

    def projection_bytes(self) -> int:
        """Bytes the file stores the seven block projections' weights in (what a GGUF-native base holds)."""
        names = (name for link in self._plan.values() for name, _ in link.gguf)
        return sum(int(self.gguf_tensor(name).n_bytes) for name in names if PROJECTION.fullmatch(name))

    def tensor_type(self, hf_name: str) -> str:
        """The ggml type name (``Q4_K``, ``F32``, ...) the file stores tensor ``hf_name`` in."""
        return self.gguf_tensor(self._plan[hf_name].gguf[0][0]).tensor_type.name

    @property
    def own_dtype(self) -> torch.dtype:
        """The precision the file's weight matrices hold: float16 when each is F16 or in blocks (whose scales are
        f16; their values then round to f16, within about 1/2048 of each), bfloat16 when each is BF16, else
        float32 (F32 weights, or BF16 beside other types)."""
        kinds = {self.tensor_type(hf) for hf, shape in self.tensor_shapes().items() if len(shape) >= 2}
        if kinds == {"BF16"}:
            return torch.bfloat16
        return torch.float16 if not kinds & {"F32", "BF16"} else torch.float32

    def _rotary_heads(self, name: str) -> int:
        return self.config["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]

    def checkpoint(self) -> GGUFCheckpoint:
        """The tensors as a checkpoint :func:`nibble.model.load_model` reads (see :class:`GGUFCheckpoint`)."""
        return GGUFCheckpoint(self)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` for every tensor, one at a time (drop each before asking for the next)."""
        for name in self._plan:
            yield name, self.tensor(name, dtype)


class GGUFCheckpoint(Checkpoint):
    """A GGUF model's tensors under their HF names, read the way a safetensors ``Checkpoint`` is read: each
    as fp32 (dequantized), or a 2-D weight in its own blocks with :meth:`quantized`."""

    def __init__(self, model: GGUFModel):
        super().__init__([], model.path)
        self.model = model
        self._infos = {
            name: TensorInfo(name, "F32", shape, 0, 0, model.path) for name, shape in model.tensor_shapes().items()
        }

    def get_tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        self.info(name)
        tensor = self.model.tensor(name, dtype or torch.float32)
        return tensor if device is None else tensor.to(device)

    def items_stream(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._infos:
            yield name, self.get_tensor(name, dtype)

    def quantized(self, name: str) -> GGUFWeight:
        """The 2-D weight ``name`` in the file's own blocks (see :meth:`GGUFModel.quantized`)."""
        self.info(name)
        return self.model.quantized(name)


def _check_dequantizable(path: Path, tensor) -> None:
    """Fail before any output is written when the gguf package cannot dequantize this tensor's type."""
    first_row = np.ascontiguousarray(tensor.data.reshape(-1, tensor.data.shape[-1])[:1])
    try:
        gguf.quants.dequantize(first_row, tensor.tensor_type)
    except NotImplementedError:
        raise NibbleError(
            f"{path}: tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; convert a file with F32/F16/BF16/Q4_0/Q4_1/Q5_*/Q8_0/K-quant tensors"
        ) from None


def open_gguf(path: str | Path) -> GGUFModel:
    """Open and validate a GGUF model file (see :class:`GGUFModel`)."""
    return GGUFModel(path)


def source_record(path: Path) -> dict[str, Any]:
    """What ``gguf_source.json`` records of the file a directory was converted from."""
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def native_model(path: str | Path) -> GGUFModel:
    """The GGUF file whose own blocks a GGUF-native base keeps (see :func:`gguf_source`), opened.

    Raises:
        NibbleError: anything :func:`gguf_source` or :func:`open_gguf` rejects.
    """
    return open_gguf(gguf_source(path))


def gguf_source(path: str | Path) -> Path:
    """``path`` itself (a file), or the .gguf file the directory ``path`` was converted from (recorded in its
    ``gguf_source.json``), checked to be unchanged since.

    Raises:
        NibbleError: a directory that was not converted from a GGUF file, or a source file that is gone or
            changed.
    """
    path = Path(path)
    if path.is_dir():
        marker = path / SOURCE_NAME
        if not marker.is_file():
            raise NibbleError(
                f"{path}: not converted from a .gguf file, so it has no GGUF blocks to keep; pass the .gguf file "
                "as --model, or use --quant-format nf4 or int4"
            )
        record = read_json_object(marker, "convert the .gguf file again")
        source = Path(str(record.get("path", "")))
        if not source.is_file():
            raise NibbleError(f"{marker}: the GGUF file it was converted from, {source}, is gone; pass it as --model")
        if source_record(source) != record:
            raise NibbleError(
                f"{source}: changed since {path} was converted from it; pass the .gguf file itself as --model"
            )
        path = source
    return path

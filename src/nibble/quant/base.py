"""The interface every 4-bit weight format shares."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from nibble.errors import NibbleError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class QuantizedWeight(ABC):
    """A frozen weight stored in 4 bits, plus what is needed to restore it.

    Subclasses (``NF4Weight``, ``INT4Weight``) hold tensors only; ``format`` names the layout.
    """

    format: str
    packed: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight in ``dtype`` and its original shape."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this weight is made of, by attribute name."""

    @abstractmethod
    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors to store for the weight whose state-dict key is ``prefix`` (e.g. ``q_proj.weight``)."""

    @abstractmethod
    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The same weight (format, shape, parameters) made of ``tensors``, named as :meth:`tensors` names them."""

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Rows ``start:stop`` of a 2-D weight as a weight of their own, sharing this one's tensors (how one
        expert is read out of a layer's experts stored as one ``[experts * out, in]`` weight).

        Raises:
            NibbleError: the format cannot cut its blocks there.
        """
        raise NibbleError(f"a {self.format} weight cannot be cut into rows")

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """A copy with ``fn`` applied to every tensor (used to move between devices)."""
        return self.with_tensors({name: fn(t) for name, t in self.tensors().items()})

    def memory_bytes(self) -> int:
        """Bytes held by all tensors of this weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return self.map_tensors(lambda t: t.to(device))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, bytes={self.memory_bytes()})"


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Reject weights that cannot be quantized, naming the problem."""
    if not isinstance(weight, torch.Tensor):
        raise NibbleError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise NibbleError(f"{name}: dtype {weight.dtype} cannot be quantized; use float32, float16 or bfloat16")
    if weight.numel() == 0:
        raise NibbleError(f"{name}: tensor is empty")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise NibbleError(f"{name}: holds {bad} NaN/inf value(s); fix the checkpoint before quantizing")

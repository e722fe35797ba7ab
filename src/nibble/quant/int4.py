"""INT4 group-wise: symmetric signed 4-bit with one fp16 scale per group of input features.

Layout (the Linear4Bit layout read by the fused kernels):
- ``packed`` uint8 ``[out, in/2]``: element ``2j`` of a row in the low nibble, ``2j+1`` in the high
  nibble, each stored offset-binary (``q + 8``, so q in [-8, 7]);
- ``scales`` fp16 ``[out, in/group_size]``: ``absmax(group) / 7``, so values dequantize as ``q * scale``;
- an optional bias ``[out]`` lives beside the weight (``{prefix}.bias``), not in it.
"""

from __future__ import annotations

import torch

from nibble.errors import NibbleError
from nibble.quant.base import QuantizedWeight, check_weight
from nibble.quant.spec import INT4_GROUP_SIZES as VALID_GROUP_SIZES
from nibble.quant.spec import indivisible_group


class INT4Weight(QuantizedWeight):
    """A 2-D weight in group-wise INT4."""

    format = "int4"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype):
        if packed.dim() != 2 or packed.dtype != torch.uint8:
            raise NibbleError(f"INT4 packed data must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        if group_size not in VALID_GROUP_SIZES:
            raise NibbleError(f"group_size {group_size} is not supported; use one of {VALID_GROUP_SIZES}")
        if in_features % group_size:
            raise NibbleError(indivisible_group(in_features, group_size))
        if tuple(scales.shape) != (out_features, in_features // group_size):
            raise NibbleError(
                f"INT4 scales must have shape {(out_features, in_features // group_size)}, got {tuple(scales.shape)}"
            )
        self.packed = packed
        self.scales = scales.to(torch.float16)
        self.group_size = group_size
        self.shape = torch.Size((out_features, in_features))
        self.dtype = dtype

    @property
    def blocksize(self) -> int:
        return self.group_size

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> INT4Weight:
        return INT4Weight(tensors["packed"], tensors["scales"], self.group_size, self.dtype)

    def rows(self, start: int, stop: int) -> INT4Weight:
        return INT4Weight(self.packed[start:stop], self.scales[start:stop], self.group_size, self.dtype)

    def codes(self) -> torch.Tensor:
        """The signed 4-bit values as int8 ``[out, in]``."""
        low = (self.packed & 15).to(torch.int8) - 8
        high = (self.packed >> 4).to(torch.int8) - 8
        return torch.stack([low, high], dim=-1).view(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.shape
        groups = self.codes().view(out_features, -1, self.group_size).float()
        return (groups * self.scales.float().unsqueeze(-1)).view(self.shape).to(dtype)

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors of the weight under the key ``prefix`` (``x.weight``): ``x.weight_4bit``, ``x.scales_4bit``."""
        wkey, skey = _keys(prefix)
        return {wkey: self.packed, skey: self.scales}

    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        prefix: str = "weight",
        source: str = "state dict",
        in_features: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> INT4Weight:
        """Read the tensors :meth:`state_dict` writes for key ``prefix``; the group size follows from the shapes."""
        wkey, skey = _keys(prefix)
        for key in (wkey, skey):
            if key not in sd:
                raise NibbleError(f"{source}: missing tensor '{key}' of an INT4 weight")
        packed, scales = sd[wkey], sd[skey]
        if packed.dim() != 2 or scales.dim() != 2 or scales.shape[1] == 0:
            raise NibbleError(f"{source}: '{wkey}' and '{skey}' must both be 2-D")
        k = packed.shape[1] * 2
        if in_features is not None and k != in_features:
            raise NibbleError(f"{source}: '{wkey}' holds {k} input features, expected {in_features}")
        if k % scales.shape[1]:
            raise NibbleError(f"{source}: '{skey}' has {scales.shape[1]} groups, which do not divide {k} features")
        try:
            return cls(packed.view(torch.uint8), scales, k // scales.shape[1], dtype)
        except NibbleError as exc:
            raise NibbleError(f"{source}: '{prefix}': {exc}") from None


def join_rows(parts: list[INT4Weight]) -> INT4Weight:
    """2-D weights of equal columns and group size as one weight of all their rows."""
    first = parts[0]
    if any(p.shape[1] != first.shape[1] or p.group_size != first.group_size for p in parts):
        raise NibbleError("INT4 weights join by rows only with equal columns and group size")
    packed = torch.cat([p.packed for p in parts])
    return INT4Weight(packed, torch.cat([p.scales for p in parts]), first.group_size, first.dtype)


def _keys(prefix: str) -> tuple[str, str]:
    """The packed and scale tensor names of the weight stored under ``prefix`` (``x.weight`` or ``weight``)."""
    module = prefix.removesuffix("weight") if prefix.endswith("weight") else prefix + "."
    return f"{module}weight_4bit", f"{module}scales_4bit"


def quantize(weight: torch.Tensor, group_size: int = 128) -> INT4Weight:
    """Quantize a 2-D fp32/fp16/bf16 weight ``[out, in]`` to group-wise INT4.

    Raises:
        NibbleError: not 2-D, non-float, NaN/inf, or ``in`` not divisible by ``group_size``.
    """
    check_weight(weight)
    if weight.dim() != 2:
        raise NibbleError(f"INT4 quantizes 2-D weights [out, in]; got shape {tuple(weight.shape)}")
    if group_size not in VALID_GROUP_SIZES:
        raise NibbleError(f"group_size {group_size} is not supported; use one of {VALID_GROUP_SIZES}")
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise NibbleError(indivisible_group(in_features, group_size))
    groups = weight.detach().float().view(out_features, -1, group_size)  # [out, G, group]
    scales = (groups.abs().amax(dim=-1) / 7).to(torch.float16)
    inv = 1.0 / scales.float().clamp(min=torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = torch.round(groups * inv).clamp_(-8, 7).to(torch.int16) + 8
    q = q.view(out_features, in_features // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).to(torch.uint8)
    return INT4Weight(packed, scales, group_size, weight.dtype)

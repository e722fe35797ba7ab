"""Triton kernels run on CPU tensors through the interpreter; it must be on before triton is imported."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from nibble.quant import QuantizedWeight, quantize  # noqa: E402

# name -> (quantize options, in_features): each exercises a different way of reading scales.
WEIGHTS = {
    "nf4": ({"format": "nf4"}, 128),  # one scale per row per K tile
    "nf4-dq": ({"format": "nf4", "double_quant": True}, 384),  # 270 blocks: two nested blocks of 256
    "nf4-bs32": ({"format": "nf4", "blocksize": 32}, 128),  # K tile wider than a block: per-element scales
    "nf4-unaligned": ({"format": "nf4"}, 96),  # blocks straddle rows; partial K tile
    "int4-g32": ({"format": "int4", "group_size": 32}, 64),
    "int4-g128": ({"format": "int4", "group_size": 128}, 256),
}


@pytest.fixture
def make_weight():
    """``make_weight(name, out_features=45) -> (QuantizedWeight, in_features)`` from a seeded random weight."""

    def make(name: str, out_features: int = 45) -> tuple[QuantizedWeight, int]:
        options, in_features = WEIGHTS[name]
        generator = torch.Generator().manual_seed(list(WEIGHTS).index(name))
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        return quantize(weight, **options), in_features

    return make


# Per output dtype: relative bound per element (one rounding step of the dtype) plus an absolute floor
# relative to the largest output, for values near zero where fp32 summation order shows.
_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype and shape, and within the dtype's bound of the reference (fp32: 1e-5 relative)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item()
    rtol = _RTOL[expected.dtype]
    if expected.dtype in (torch.float32, torch.float64):
        err = (a - e).abs().max().item()
        assert err <= rtol * scale, f"max error {err:.3g} exceeds {rtol:g} x max |reference| {scale:.3g}"
    else:
        bad = (a - e).abs() > rtol * e.abs() + 1e-5 * scale
        assert not bad.any(), f"{int(bad.sum())} elements beyond one rounding step, e.g. {a[bad][:3]} vs {e[bad][:3]}"


@pytest.fixture
def close():
    """The comparison every kernel test uses (see ``assert_matches``)."""
    return assert_matches

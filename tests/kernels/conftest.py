"""Kernel tests run on CUDA when there is a device (compiled kernels), else on CPU through the Triton interpreter.

``TRITON_INTERPRET`` must be set before the kernels are defined (``@triton.jit`` reads it then, when nibble's
kernel modules are imported); an explicit ``TRITON_INTERPRET=1`` interprets on CPU even where CUDA is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from nibble.quant import QuantizedWeight, int4, nf4  # noqa: E402

# Where the tests put the tensors the kernels read.
DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")


@pytest.fixture
def device() -> torch.device:
    """The device of the tensors the kernels read: cuda (compiled kernels), or cpu (the interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def fp32_reference_accumulation(monkeypatch):
    """On CUDA the cuBLAS reference accumulates half-precision products in fp32, as the kernels do."""
    if DEVICE.type == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)


# name -> (quantize function and options, in_features): each exercises a different way of reading scales.
WEIGHTS = {
    "nf4": (nf4.quantize, {}, 128),  # one scale per row per K tile
    "nf4-dq": (nf4.quantize, {"double_quant": True}, 384),  # 270 blocks: two nested blocks of 256
    "nf4-bs32": (nf4.quantize, {"blocksize": 32}, 128),  # K tile wider than a block: per-element scales
    "nf4-unaligned": (nf4.quantize, {}, 96),  # blocks straddle rows; partial K tile
    "int4-g32": (int4.quantize, {"group_size": 32}, 64),
    "int4-g128": (int4.quantize, {"group_size": 128}, 256),
}


@pytest.fixture
def make_weight():
    """``make_weight(name, out_features=45) -> (QuantizedWeight on DEVICE, in_features)`` from a seeded weight."""

    def make(name: str, out_features: int = 45) -> tuple[QuantizedWeight, int]:
        quantize, options, in_features = WEIGHTS[name]
        generator = torch.Generator().manual_seed(list(WEIGHTS).index(name))
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        return quantize(weight, **options).to(DEVICE), in_features

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

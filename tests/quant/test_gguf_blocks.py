"""GGUF block types against the ``gguf`` package and llama.cpp: torch dequantize bit-exact, quantizers' bytes.

The gguf package dequantizes every type here in numpy (llama.cpp's formulas) and quantizes all but the
K-quants; its values are the oracle, compared as raw fp32 bits. The K-quant quantizers are checked against
the bytes llama.cpp itself wrote for a fixed input.
"""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
import torch

from nibble import kernels
from nibble.errors import NibbleError
from nibble.nn import QuantLinear
from nibble.quant import QuantSpec, quantize
from nibble.quant.gguf import BLOCKS, GGUFWeight, dequantize_blocks, quantize_blocks

PACKAGE_QUANTIZED = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def weight(rows: int = 6, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with the cases that stress a quantizer: an outlier, an all-zero super-block, a constant
    block, an all-positive block and an all-negative super-block."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    w[0, 7] = 1.5
    w[1, :256] = 0.0
    w[2, :32] = 0.02
    w[3, 256:288] = w[3, 256:288].abs() + 0.01
    w[4, :256] = -w[4, :256].abs()
    return w


def random_blocks(kind: str, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Random bytes for ``n`` blocks of ``kind`` (every bit pattern of the codes and scales) with finite fp16
    block scales, so every path of the format is exercised."""
    _, size = BLOCKS[kind]
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, size), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, 2, generator=gen) * 0.02 - 0.005).half().view(torch.uint8)  # [n, 4]
    if kind == "Q6_K":
        data[:, -2:] = scales[:, :2]
    elif kind.endswith("_K"):
        data[:, :4] = scales
    elif kind in ("Q4_1", "Q5_1"):
        data[:, :4] = scales
    elif kind in ("Q8_0", "Q4_0", "Q5_0"):
        data[:, :2] = scales[:, :2]
    else:  # F16 / BF16 / F32 values: keep them finite
        return gen_values(kind, n * size, gen).view(n, size)
    return data


def gen_values(kind: str, nbytes: int, gen: torch.Generator) -> torch.Tensor:
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[kind]
    count = nbytes // torch.empty((), dtype=dtype).element_size()
    return torch.randn(count, generator=gen).to(dtype).view(torch.uint8)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_dequantize_is_bit_exact_to_gguf(kind):
    data = random_blocks(kind)
    theirs = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind]).reshape(data.shape[0], -1)
    ours = dequantize_blocks(data, kind)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == theirs.shape
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), np.asarray(theirs, np.float32).view(np.uint32))


@pytest.mark.parametrize("kind", PACKAGE_QUANTIZED)
def test_quantize_matches_gguf_package(kind):
    w = weight()
    ours = quantize_blocks(w, kind)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
    np.testing.assert_array_equal(ours.numpy(), np.ascontiguousarray(theirs).view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize(("kind", "bound"), [("Q4_K", 0.08), ("Q6_K", 0.02)])
def test_k_quants_round_trip(kind, bound):
    w = weight()
    data = quantize_blocks(w, kind)
    assert tuple(data.shape) == (6, 512 // 256 * BLOCKS[kind][1])
    back = torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind]))
    assert back.shape == w.shape
    normal = torch.ones(6, dtype=torch.bool)
    normal[0] = False  # the outlier row is judged on its own below
    err = (back - w)[normal]
    assert float(err.pow(2).mean().sqrt() / w[normal].pow(2).mean().sqrt()) < bound
    assert torch.equal(back[1, :256], torch.zeros(256))  # an all-zero super-block stays exactly zero
    assert abs(float(back[0, 7]) - 1.5) < 1.5 * bound  # the outlier keeps its value


# sha256 of the bytes llama.cpp's own quantizer (ggml_quantize_chunk, no importance matrix; llama-cpp-python
# 0.3.36 built from source) writes for golden_weights(); benchmarks/llamacpp_check.py repeats the comparison
# on more data, the model's weights included.
LLAMA_CPP_DIGESTS = {
    "Q4_K": "b1246a3ef0e7a9d06c52f0a50c6fccf2690dd9a4b07f1f6790c7d8252f8c7138",
    "Q6_K": "2c4765cc041a8e9081679f160d779890901b664f8e6c61b0d1792a8d29961d2c",
}


def golden_weights() -> torch.Tensor:
    """16 x 1536 values from numpy's frozen legacy generator, with an all-zero, an all-positive and an
    all-negative super-block and an outlier."""
    x = (np.random.RandomState(5).standard_normal((16, 1536)) * 0.05).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 256:512] = np.abs(x[2, 256:512])
    x[3, :512] = -np.abs(x[3, :512])
    x[4, 7] = 1.5
    return torch.from_numpy(x)


@pytest.mark.parametrize("kind", list(LLAMA_CPP_DIGESTS))
def test_k_quants_write_llama_cpps_bytes(kind):
    digest = hashlib.sha256(quantize_blocks(golden_weights(), kind).numpy().tobytes()).hexdigest()
    assert digest == LLAMA_CPP_DIGESTS[kind]


def test_k_quants_beat_their_32_block_neighbours():
    """Q4_K's scale search spends its extra scale bits well: lower error than Q4_1, and Q6_K than Q5_1."""
    w = weight(rows=16, seed=1)

    def error(kind: str) -> float:
        return float((dequantize_blocks(quantize_blocks(w, kind), kind) - w).pow(2).mean())

    assert error("Q4_K") < error("Q4_1")
    assert error("Q6_K") < error("Q5_1")


def test_quantize_rejects_what_the_format_cannot_hold():
    with pytest.raises(NibbleError, match="do not tile Q4_K blocks of 256"):
        quantize_blocks(torch.randn(4, 320), "Q4_K")
    with pytest.raises(NibbleError, match="does not write ggml type Q5_K"):
        quantize_blocks(torch.randn(4, 256), "Q5_K")
    with pytest.raises(NibbleError, match="NaN"):
        quantize_blocks(torch.full((2, 256), float("nan")), "Q6_K")
    with pytest.raises(NibbleError, match="keeps the blocks a .gguf file stores"):
        quantize(torch.randn(4, 256), QuantSpec("gguf"))


def test_weight_rows_state_and_devices():
    w = weight()
    q = GGUFWeight(quantize_blocks(w, "Q4_K"), "Q4_K", 512)
    dense = q.dequantize()
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    assert torch.equal(q.select_rows(order).dequantize(), dense[order])  # rows move whole, values unchanged
    assert q.memory_bytes() == 6 * 2 * 144
    state = q.state_dict("proj.weight")
    assert state["proj.weight"] is q.packed and int(state["proj.weight.ggml_type"]) == 12  # GGML_TYPE_Q4_K
    copy = q.map_tensors(torch.clone)
    assert copy.packed is not q.packed and torch.equal(copy.dequantize(), dense)
    assert torch.equal(q.dequantize(torch.bfloat16), dense.to(torch.bfloat16))
    with pytest.raises(NibbleError, match="take 288 bytes"):
        GGUFWeight(q.packed[:, :100], "Q4_K", 512)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quant_linear_on_gguf_blocks(backend):
    """Forward and input gradient of a QuantLinear over Q6_K blocks equal a dense layer on the dequantized
    weight, whichever kernels are chosen (the Triton ones do not read GGUF blocks: the reference runs)."""
    w = weight(rows=8, seed=2)
    layer = QuantLinear(GGUFWeight(quantize_blocks(w, "Q6_K"), "Q6_K", 512), bias=torch.randn(8))
    dense = layer.dequantize()
    x = torch.randn(3, 512, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with kernels.use_backend(backend):
        y = layer(x)
        y.sum().backward()
    y_ref = torch.nn.functional.linear(x_ref, dense, layer.bias)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)

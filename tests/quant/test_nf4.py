"""NF4 against bitsandbytes, the byte-level oracle."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nibble.errors import NibbleError
from nibble.quant import nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (33, 70): partial last block and an odd element count; (5,): smaller than one block.
SHAPES = [(33, 70), (64, 256), (300, 257), (5,), (3, 5, 128)]


def bnb_quantize(w, blocksize, double_quant):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def assert_same_bytes(ours, packed, state, double_quant):
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert ours.absmax.dtype == torch.uint8
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.offset == float(state.offset)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_match_bitsandbytes(shape, dtype, blocksize, double_quant):
    torch.manual_seed(hash((shape, blocksize)) % 2**31)
    w = (torch.randn(shape) * 2.5).to(dtype)
    packed, state = bnb_quantize(w, blocksize, double_quant)
    ours = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    assert_same_bytes(ours, packed, state, double_quant)
    assert ours.shape == w.shape and ours.dtype == dtype


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_bitsandbytes(dtype, double_quant):
    # bitsandbytes 0.50.2's CPU dequantize_4bit is wrong when a row is shorter than a block
    # (e.g. 64x64 at blocksize 128), so rows here are at least one block long.
    torch.manual_seed(1)
    for shape, blocksize in [((48, 320), 64), ((17, 384), 128), ((9, 1000), 256)]:
        w = torch.randn(shape).to(dtype)
        packed, state = bnb_quantize(w, blocksize, double_quant)
        ours = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
        assert torch.equal(ours.dequantize(dtype), bnbf.dequantize_4bit(packed, state))


def test_values_on_codes_and_midpoints_match_bitsandbytes():
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    # Every block holds 1.0, so absmax is 1 and value/absmax is the value itself: exact codes and exact
    # midpoints are hit, and a midpoint must go to the lower code.
    block = torch.cat([code, midpoints, -midpoints, torch.ones(64 - 16 - 30)])
    w = torch.stack([block, block.flip(0)])
    packed, state = bnb_quantize(w, 64, False)
    ours = nf4.quantize(w, blocksize=64)
    assert torch.equal(ours.packed, packed.view(-1))
    restored = ours.dequantize()[0]
    assert torch.equal(restored[:16], code)
    assert torch.equal(restored[16:31], code[:-1])  # ties to the lower index


def test_cell_lookup_equals_binary_search_next_to_every_cell_edge_and_midpoint():
    """The grid lookup behind quantize against bucketize (nearest code, ties low) where it could go wrong:
    on and one float either side of every cell edge and every midpoint, past +-1, and on random values."""
    code = nf4.nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    edges = (torch.arange(-1, nf4._CELLS + 2, dtype=torch.float64) - 0.5) / (nf4._CELLS / 2) - 1
    centers = torch.cat([edges.float(), midpoints, torch.tensor([-1.0, 0.0, 1.0])])
    near = centers
    for _ in range(2):
        up, down = torch.full_like(near, 2.0), torch.full_like(near, -2.0)
        near = torch.cat([near, near.nextafter(up), near.nextafter(down)])
    values = torch.cat([near, torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    values = values.clamp(-1.0000002, 1.0000002)  # one rounding step past +-1 at most, as scaling can give
    ours = torch.empty(values.numel(), dtype=torch.uint8)
    nf4._nearest_codes(values, ours)
    assert torch.equal(ours.long(), torch.bucketize(values, midpoints))


def test_high_nibble_holds_first_element():
    w = torch.tensor([1.0, -1.0, 0.0])
    q = nf4.quantize(w, blocksize=64)
    assert q.packed.tolist() == [(15 << 4) | 0, (7 << 4) | 7]


def test_zero_block_and_constant_weight():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    packed, state = bnb_quantize(w, 64, True)
    ours = nf4.quantize(w, blocksize=64, double_quant=True)
    assert_same_bytes(ours, packed, state, True)
    assert torch.equal(ours.dequantize(), bnbf.dequantize_4bit(packed, state))


def test_dynamic_code_matches_bitsandbytes():
    assert torch.equal(nf4.dynamic_code(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trips_with_bitsandbytes(double_quant):
    torch.manual_seed(2)
    w = torch.randn(40, 192, dtype=torch.bfloat16)
    packed, state = bnb_quantize(w, 64, double_quant)
    # bitsandbytes' serialized layout -> nibble
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = nf4.NF4Weight.from_state_dict(sd, "weight")
    assert torch.equal(ours.dequantize(torch.bfloat16), bnbf.dequantize_4bit(packed, state))
    # nibble -> bitsandbytes
    mine = nf4.quantize(w, blocksize=64, double_quant=double_quant).state_dict("weight")
    assert set(mine) == set(sd)
    qs = {k.removeprefix("weight."): v for k, v in mine.items() if k != "weight"}
    loaded = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(mine["weight"], loaded), ours.dequantize(torch.bfloat16))
    assert mine["weight"].shape == packed.shape


def test_state_dict_errors_name_the_key():
    sd = nf4.quantize(torch.randn(8, 64), double_quant=True).state_dict("layer.weight")
    broken = dict(sd)
    del broken["layer.weight.nested_absmax"]
    with pytest.raises(NibbleError, match="model.safetensors.*layer.weight.nested_absmax"):
        nf4.NF4Weight.from_state_dict(broken, "layer.weight", source="model.safetensors")
    broken = dict(sd)
    broken["layer.weight.quant_state.bitsandbytes__nf4"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(NibbleError, match="quant_state"):
        nf4.NF4Weight.from_state_dict(broken, "layer.weight")
    broken = dict(sd)
    broken["layer.weight"] = broken["layer.weight"][:-1]
    with pytest.raises(NibbleError, match="layer.weight.*uint8 bytes"):
        nf4.NF4Weight.from_state_dict(broken, "layer.weight")


@pytest.mark.parametrize(
    "weight,message",
    [
        (torch.tensor([1.0, float("nan")]), "NaN/inf"),
        (torch.tensor([float("inf"), 1.0]), "NaN/inf"),
        (torch.arange(8), "dtype torch.int64"),
        (torch.empty(0), "empty"),
    ],
)
def test_bad_weights_are_named(weight, message):
    with pytest.raises(NibbleError, match=message):
        nf4.quantize(weight)


def test_bad_blocksize():
    with pytest.raises(NibbleError, match="blocksize 48"):
        nf4.quantize(torch.randn(64), blocksize=48)


def test_memory_and_device_move():
    q = nf4.quantize(torch.randn(128, 256), blocksize=64, double_quant=True)
    assert q.memory_bytes() == 128 * 256 // 2 + 512 + 2 * 4 + 256 * 4
    moved = q.to("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 150),
    scale=st.floats(1e-3, 1e3),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_is_within_half_a_code_gap(rows, cols, scale, blocksize, double_quant, seed):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * scale
    q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    err = (q.dequantize() - w).abs().view(-1)
    n = w.numel()
    block_absmax = torch.nn.functional.pad(w.abs().view(-1), (0, -n % blocksize)).view(-1, blocksize).amax(1)
    half_gap = (nf4.nf4_code().diff().max() / 2).item()
    bound = block_absmax.repeat_interleave(blocksize)[:n] * half_gap
    if double_quant:
        # 8-bit scales move each block scale by at most a small relative amount.
        bound = bound * 1.02 + block_absmax.repeat_interleave(blocksize)[:n] * 0.02
    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all())

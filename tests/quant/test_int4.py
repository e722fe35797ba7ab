"""Group-wise INT4: exact on its grid, bounded error elsewhere, clear errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nibble.errors import NibbleError
from nibble.quant import int4


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([64, 128]),
    exponent=st.integers(-12, 4),
    seed=st.integers(0, 2**16),
)
def test_representable_grid_is_exact(rows, groups, group_size, exponent, seed):
    gen = torch.Generator().manual_seed(seed)
    step = 2.0**exponent
    q = torch.randint(-7, 8, (rows, groups, group_size), generator=gen)
    q[..., 0] = 7  # each group reaches the scale's top code, so the scale is exactly `step`
    w = (q * step).view(rows, groups * group_size).float()
    packed = int4.quantize(w, group_size=group_size)
    assert torch.equal(packed.dequantize(), w)
    assert torch.equal(packed.codes().view_as(q).long(), q)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_round_trip_error_within_half_a_step(rows, scale, seed):
    torch.manual_seed(seed)
    w = torch.randn(rows, 128) * scale
    q = int4.quantize(w, group_size=64)
    step = q.scales.float().repeat_interleave(64, dim=1)
    assert bool(((q.dequantize() - w).abs() <= step * 0.5 * (1 + 1e-2)).all())


def test_layout_low_nibble_first_offset_binary():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -7.0, 7.0
    q = int4.quantize(w, group_size=64)
    assert q.packed.shape == (1, 32) and q.scales.dtype == torch.float16
    assert q.packed[0, 0].item() == (15 << 4) | 1
    assert q.packed[0, 1].item() == (8 << 4) | 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_dict_round_trip(dtype):
    w = torch.randn(12, 256).to(dtype)
    q = int4.quantize(w, group_size=128)
    sd = q.state_dict("model.layers.0.mlp.up_proj.weight")
    assert set(sd) == {"model.layers.0.mlp.up_proj.weight_4bit", "model.layers.0.mlp.up_proj.scales_4bit"}
    back = int4.INT4Weight.from_state_dict(sd, "model.layers.0.mlp.up_proj.weight", in_features=256, dtype=dtype)
    assert back.group_size == 128
    assert torch.equal(back.dequantize(dtype), q.dequantize(dtype))


def test_errors_are_clear():
    with pytest.raises(
        NibbleError,
        match="in_features 100 is not divisible by INT4 group_size 64; no INT4 group size "
        "divides it: use --quant-format nf4",
    ):
        int4.quantize(torch.randn(4, 100), group_size=64)
    with pytest.raises(NibbleError, match="2-D"):
        int4.quantize(torch.randn(128), group_size=64)
    with pytest.raises(NibbleError, match="NaN/inf"):
        int4.quantize(torch.full((2, 64), float("nan")), group_size=64)
    with pytest.raises(NibbleError, match="group_size 48"):
        int4.quantize(torch.randn(2, 96), group_size=48)
    sd = int4.quantize(torch.randn(4, 128), group_size=64).state_dict("p.weight")
    with pytest.raises(NibbleError, match="w.safetensors.*p.scales_4bit"):
        int4.INT4Weight.from_state_dict({"p.weight_4bit": sd["p.weight_4bit"]}, "p.weight", source="w.safetensors")
    with pytest.raises(NibbleError, match="expected 256"):
        int4.INT4Weight.from_state_dict(sd, "p.weight", in_features=256)

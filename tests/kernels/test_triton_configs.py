"""Every autotune config of the GEMM-shaped kernels against the torch reference, one config at a time.

Under the interpreter the autotuners hold one fixed config (``triton_common.INTERPRETED_CONFIGS``), so the
configs a GPU tunes over would otherwise first run there. Each config here replaces the kernel's autotuner for
one call through the public function, at a shape off its tile grid: M 1/13 (small-M configs, split reduction
with atomic adds) or 17/130 (large-M), N 45/200, K 96/384/4160, cycling over fp32 and bf16, NF4 (plain,
double-quantized, blocks straddling rows at K 96) and INT4, with and without bias.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nibble.kernels import reference, triton_common, triton_gemm, triton_grad_input
from nibble.quant import int4, nf4

KERNELS = {  # name -> (module, jit function, output pointer)
    "matmul": (triton_gemm, triton_gemm._matmul_kernel, "y_ptr"),
    "grad_input": (triton_grad_input, triton_grad_input._grad_input_kernel, "dx_ptr"),
}
FORMATS = {
    "nf4": lambda w: nf4.quantize(w),
    "nf4-dq": lambda w: nf4.quantize(w, double_quant=True),
    "int4": lambda w: int4.quantize(w, group_size=32),
}
DTYPES = (torch.float32, torch.bfloat16)


def _cases() -> list[pytest.param]:
    """One case per (kernel, family, config): shapes, formats, dtypes and bias cycle so that every value is met."""
    cases = []
    for kernel, (module, _, _) in KERNELS.items():
        for family, configs, ms in (
            ("small", triton_common.SMALL_M_CONFIGS, (1, 13)),
            ("large", module.LARGE_M_CONFIGS, (17, 130)),
        ):
            shapes = itertools.cycle(itertools.product(ms, (45, 200), (96, 384, 4160)))
            variants = itertools.cycle(itertools.product(FORMATS, DTYPES, (True, False)))
            for index, config in enumerate(configs):
                (m, n, k), (fmt, dtype, bias) = next(shapes), next(variants)
                if m * n * k > 130 * 200 * 384:  # the interpreter is slow: the largest K only with a small M or N
                    m, n = min(ms), 45
                meta = config.kwargs
                name = f"{kernel}-{family}{index}-{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}s{meta['SPLIT']}"
                cases.append(pytest.param(kernel, family, config, m, n, k, fmt, dtype, bias, id=name))
    return cases


@pytest.mark.parametrize("kernel,family,config,m,n,k,fmt,dtype,bias", _cases())
def test_every_autotune_config_matches_the_reference(monkeypatch, close, device, kernel, family, config, m, n, k, fmt,
                                                     dtype, bias):  # fmt: skip
    module, fn, out = KERNELS[kernel]
    small, large = triton_common.autotuned(fn, ([config], [config]), out=out)
    monkeypatch.setattr(module, "_small_m", small)
    monkeypatch.setattr(module, "_large_m", large)
    generator = torch.Generator().manual_seed(m * n + k)
    qweight = FORMATS[fmt](torch.randn(n, k, generator=generator) * 0.05).to(device)
    if kernel == "matmul":
        x = torch.randn(m, k, generator=generator).to(device, dtype)
        b = torch.randn(n, generator=generator).to(device) if bias else None
        actual, expected = triton_gemm.matmul(x, qweight, b), reference.matmul(x, qweight, b)
    else:
        grad_y = torch.randn(m, n, generator=generator).to(device, dtype)
        actual = triton_grad_input.matmul_grad_input(grad_y, qweight)
        expected = reference.matmul_grad_input(grad_y, qweight)
    assert (large if family == "large" else small).best_config is config  # the config under test ran
    close(actual, expected)


def test_the_cases_cover_every_config_and_variant():
    cases = [p.values for p in _cases()]
    for module in (triton_gemm, triton_grad_input):
        assert len(module.LARGE_M_CONFIGS) == 8
    assert len(cases) == 2 * (len(triton_common.SMALL_M_CONFIGS) + 8)
    assert {c[6] for c in cases} == set(FORMATS) and {c[7] for c in cases} == set(DTYPES)
    assert {c[8] for c in cases if c[0] == "matmul"} == {True, False}
    assert {c[5] for c in cases} == {96, 384, 4160} and {c[4] for c in cases} == {45, 200}
    assert {c[3] for c in cases} == {1, 13, 17, 130}

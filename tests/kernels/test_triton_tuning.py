"""Autotuning: configs pruned by M before any is timed, the tuning time counted, and reported after a first step."""

from __future__ import annotations

import types

import pytest
import torch

from nibble import kernels
from nibble.kernels import reference, triton_common, triton_gemm, triton_grad_input
from nibble.quant import nf4
from nibble.train.trainer import Trainer


@pytest.mark.parametrize("module", [triton_gemm, triton_grad_input])
def test_configs_with_m_tiles_far_past_m_are_pruned(module):
    configs = module.LARGE_M_CONFIGS
    for bucket in (32, 64):  # every large-M tile is 64 or 128 rows: keep the 64-row ones
        kept = triton_common.prune_by_m(configs, {}, M_BUCKET=bucket)
        assert kept == [c for c in configs if c.kwargs["BLOCK_M"] == 64] and len(kept) == 3
    assert triton_common.prune_by_m(configs, {}, M_BUCKET=128) == configs
    assert triton_common.prune_by_m(configs, {"M_BUCKET": 512}) == configs
    small = triton_common.SMALL_M_CONFIGS  # one 16-row tile: nothing to prune at M <= 16
    assert triton_common.prune_by_m(small, {}, M_BUCKET=1) == small


def test_the_autotuners_prune_before_timing():
    small, large = triton_common.autotuned(
        triton_gemm._matmul_kernel, (triton_common.SMALL_M_CONFIGS, triton_gemm.LARGE_M_CONFIGS), out="y_ptr"
    )
    large.nargs = small.nargs = {}  # what Autotuner.run sets before it prunes
    assert {c.kwargs["BLOCK_M"] for c in large.prune_configs({"M_BUCKET": 32})} == {64}
    assert len(large.prune_configs({"M_BUCKET": 256})) == 8
    assert len(small.prune_configs({"M_BUCKET": 4})) == len(triton_common.SMALL_M_CONFIGS)


def test_a_launch_on_a_new_shape_counts_its_tuning_time(monkeypatch, close, device):
    # Two configs, of which M = 17 keeps one: the autotuner compiles that one without timing (so this runs under
    # the interpreter), caches it under the new key, and the clock counts the call once.
    configs = [triton_common.tile_config(64, 32, 64, 1, 2, 1, 1), triton_common.tile_config(128, 32, 64, 1, 2, 1, 1)]
    small, large = triton_common.autotuned(triton_gemm._matmul_kernel, (configs, configs), out="y_ptr")
    monkeypatch.setattr(triton_gemm, "_large_m", large)
    monkeypatch.setattr(triton_common, "_tuning", {"seconds": 0.0, "keys": 0})
    qweight = nf4.quantize(torch.randn(45, 128, generator=torch.Generator().manual_seed(0))).to(device)
    x = torch.randn(17, 128, device=device)
    for _ in range(2):
        close(triton_gemm.matmul(x, qweight), reference.matmul(x, qweight))
    assert large.best_config is configs[0]
    seconds, keys = kernels.tuning_time()
    assert keys == 1 and seconds > 0  # the second call found its key tuned


@pytest.mark.parametrize("device_type,shapes,printed", [("cuda", 3, True), ("cpu", 3, False), ("cuda", 0, False)])
def test_the_first_step_reports_tuning_on_cuda_only(monkeypatch, capsys, device_type, shapes, printed):
    monkeypatch.setattr(kernels, "tuning_time", lambda: (12.34, shapes))
    trainer = types.SimpleNamespace(device=torch.device(device_type), parallel=types.SimpleNamespace(is_main=True))
    Trainer._report_tuning(trainer)
    err = capsys.readouterr().err
    assert (err == "note: by the end of the first step the 4-bit kernels tuned for 3 shapes in 12.3 s\n") == printed
    assert printed or err == ""

"""--deterministic: torch's deterministic algorithms (and cuBLAS's fixed workspace) for the run only, and the fused
4-bit kernels on one config each with SPLIT 1 (no atomic partial sums, no timed choice of tile)."""

from __future__ import annotations

import os

import pytest
import torch

import helpers
import nibble
from nibble.train.rng import deterministic


def test_deterministic_holds_for_the_run_and_is_undone_after(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("rows", [3, 40])  # the small-M (split) and large-M families
def test_the_fused_kernels_run_one_config_with_split_1_when_deterministic(monkeypatch, rows):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels under the interpreter (TRITON_INTERPRET=1)")
    from triton.runtime.autotuner import Autotuner

    from nibble.kernels import reference, triton_gemm, triton_grad_input
    from nibble.quant import quantize

    ran: list[tuple[Autotuner, list[int]]] = []  # each launch: the autotuner and the SPLIT of its configs
    run = Autotuner.run

    def recorded(self, *args, **kwargs):
        ran.append((self, [c.kwargs["SPLIT"] for c in self.configs]))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", recorded)
    gen = torch.Generator().manual_seed(0)
    weight = quantize(torch.randn(48, 128, generator=gen), "nf4")
    x, grad_y = torch.randn(rows, 128, generator=gen), torch.randn(rows, 48, generator=gen)
    with deterministic(True):
        got = triton_gemm.matmul(x, weight), triton_grad_input.matmul_grad_input(grad_y, weight)
    torch.testing.assert_close(got[0], reference.matmul(x, weight), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], reference.matmul_grad_input(grad_y, weight), atol=1e-4, rtol=1e-4)
    triton_gemm.matmul(x, weight), triton_grad_input.matmul_grad_input(grad_y, weight)
    (pinned_gemm, splits), (pinned_grad, grad_splits), (tuned_gemm, tuned_splits), (tuned_grad, _) = ran
    assert splits == grad_splits == [1]
    assert pinned_gemm is not tuned_gemm and pinned_grad is not tuned_grad
    assert tuned_splits == ([2] if rows <= 16 else [1])  # the interpreter's own config again (small M: split 2)


def test_a_deterministic_run_sets_the_mode_for_its_steps_and_trains_as_without(tmp_path, monkeypatch):
    base, _ = helpers.make_hf_checkpoint(tmp_path / "base", "qwen3")
    helpers.write_tokenizer(base)
    rows = [{"text": w, "label": w[0]} for w in ["apple", "berry", "avocado", "banana"]] * 3
    data = helpers.write_jsonl(tmp_path / "data.jsonl", rows)
    seen = []
    from nibble.train import trainer

    step = trainer.Trainer.step

    def recorded(self):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return step(self)

    monkeypatch.setattr(trainer.Trainer, "step", recorded)
    args = dict(model=str(base), data=str(data), max_steps=2, batch_size=4, save_every=0, eval_every=0, val_split=0)
    plain = nibble.train(dict(args, output=str(tmp_path / "plain")))
    fixed = nibble.train(dict(args, output=str(tmp_path / "fixed"), deterministic=True))
    assert seen == [False, False, True, True] and not torch.are_deterministic_algorithms_enabled()
    assert (tmp_path / "fixed" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "plain" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert plain.step == fixed.step == 2

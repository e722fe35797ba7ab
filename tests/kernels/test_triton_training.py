"""The Triton kernels are wired into training: a QLoRA run through ``nibble train`` with the Triton backend forced
(compiled on CUDA, interpreted on the CPU here) gives the per-step losses of the torch reference path.

The dense-copy cache is off (``--cache-budget-mb 0``): with a dense copy the 4-bit kernels would not run at all.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from nibble import kernels
from nibble.cli.main import main
from nibble.kernels import triton_ops


def test_three_qlora_steps_with_triton_kernels_give_the_torch_losses(shared_checkpoint, tmp_path, monkeypatch, device):
    path, _ = shared_checkpoint("qwen3", num_hidden_layers=1)  # the interpreter is slow: one block
    data = tmp_path / "train.jsonl"
    words = ("red", "green", "blue")
    data.write_text("".join(json.dumps({"text": f"{w} sky {w} sea", "label": w}) + "\n" for w in words * 4))
    calls: Counter[str] = Counter()
    for name in ("matmul", "matmul_grad_input"):
        op = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _op=op, _name=name: calls.update([_name]) or _op(*a))

    losses = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        argv = ["train", "--model", path, "--data", data, "--output", out, "--method", "qlora", "--max-steps", "3",
                "--batch-size", "4", "--max-seq-len", "16", "--lora-targets", "all-linear", "--cache-budget-mb", "0",
                "--dtype", "float32", "--device", str(device), "--val-split", "0", "--log-every", "1",
                "--save-every", "0", "--lr", "1e-2"]  # fmt: skip
        with kernels.use_backend(backend):
            assert main([str(a) for a in argv]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in records if r["kind"] == "train"]

    assert len(losses["triton"]) == 3
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5, abs=1e-6)
    # All 7 projections run forward in each of the 3 steps, and backward but for q/k/v, whose input (the normed
    # embeddings of a frozen table) needs no gradient.
    assert calls["matmul"] == 3 * 7 and calls["matmul_grad_input"] == 3 * 4, calls
    assert losses["torch"][0] != losses["torch"][2]  # the steps trained something

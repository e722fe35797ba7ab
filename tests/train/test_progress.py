"""Progress without a terminal: one plain line per log window on stderr, whose tokens/s, elapsed time and ETA
count training only (not loading, resuming, evaluating or checkpointing), measured on a fake clock."""

from __future__ import annotations

import json
import re
import time

import torch
from torch import nn

from helpers import label_task
from nibble.data import BatchStream, ClassificationData, LabelMap
from nibble.train import TrainConfig
from nibble.train.checkpoint import list_checkpoints
from nibble.train.metrics import classification_loss
from nibble.train.trainer import Trainer

TOKENS_PER_STEP = 4 * 4  # batches of 4 rows of 4 tokens, no padding


class Clock:
    """``time.perf_counter`` that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_trainer(out, clock: Clock, total: int, flops_per_token: int | None = None) -> Trainer:
    config = TrainConfig(model="m", data="d", output=str(out), lr=0.05, batch_size=4, log_every=2, eval_every=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 8), nn.Flatten(), nn.Linear(32, 2))
    rows = [[1 + i % 7, 2, 3, 4 + i % 5] for i in range(24)]
    data = ClassificationData(rows, [i % 2 for i in range(24)], LabelMap([0, 1]))

    def forward(m, batch):
        clock.now += 1.0  # a training step takes one second
        return m(batch["input_ids"])

    def evaluate(m):
        clock.now += 100.0  # an evaluation takes 100 s
        return {"loss": 1.0}

    def loss_fn(logits, labels):
        return classification_loss(logits, labels, False)

    stream = BatchStream(data, config.batch_size, 0, config.seed)
    task = label_task(data, loss_fn, evaluate, forward)
    trainer = Trainer(
        model=model,
        stream=stream,
        config=config,
        out=out,
        total_steps=total,
        task=task,
        flops_per_token=flops_per_token,
    )
    save = trainer.save

    def slow_save(window=None):
        clock.now += 50.0  # a checkpoint takes 50 s
        return save(window)

    trainer.save = slow_save
    return trainer


def test_progress_lines_count_training_time_only(tmp_path, monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    make_trainer(tmp_path, clock, total=4).train()
    capsys.readouterr()

    clock.now += 5000.0  # loading the model again and resuming
    resumed = make_trainer(tmp_path, clock, total=8)
    resumed.resume(dict(list_checkpoints(tmp_path / "checkpoints"))[4])
    clock.now += 5000.0
    resumed.train()

    lines = capsys.readouterr().err.splitlines()
    pattern = r"step (\d+)/8  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  tokens/s ([\d,]+)  elapsed (\S+)  eta (\S+)"
    found = [re.fullmatch(pattern, line) for line in lines]
    assert all(found) and len(found) == 2, lines
    # step 6: two 1-s steps since training began; step 8: two more, plus the evaluation at step 6 (100 s).
    assert [m.groups() for m in found] == [("6", "16", "0:00:02", "0:00:02"), ("8", "16", "0:01:44", "0:00:00")]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"]
    assert rates == [TOKENS_PER_STEP] * 4  # steps 2, 4 (first run) and 6, 8: evaluations and saves left out


def test_model_flops_are_logged_beside_tokens_per_s_and_mfu_where_the_peak_is_known(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(time, "perf_counter", clock)
    make_trainer(tmp_path / "cpu", clock, total=2, flops_per_token=10**12).train()
    trainer = make_trainer(tmp_path / "gpu", clock, total=2, flops_per_token=10**12)
    trainer.peak_flops = 64e12  # a device whose peak is known
    trainer.train()
    for run, mfu in (("cpu", None), ("gpu", TOKENS_PER_STEP * 1e12 / 64e12)):
        record = next(json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        assert record["tokens_per_s"] == TOKENS_PER_STEP and record["tflops_per_s"] == TOKENS_PER_STEP
        assert record.get("mfu") == mfu

"""A training step never reads the device back: counted with a dispatch mode (scalar reads, nonzero, boolean-mask
indexing, masked_select, unique, device-to-host copies) around every ``Trainer.step`` and log line of real
classify and instruct runs, with padded batches and with batches that have no padding at all. What is read, once
per log window, is the window's losses and norms."""

from __future__ import annotations

import pytest

import helpers
import nibble
from nibble.train import trainer
from sync_counter import SyncCounter

STEPS, LOG_EVERY = 20, 10
WORDS = ["apple", "berry", "avocado", "banana", "apricot", "blueberry and more", "a"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    path, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    helpers.write_tokenizer(path)
    return path


def _count(monkeypatch) -> tuple[SyncCounter, SyncCounter]:
    """Counters around every step and every log line of the Trainer."""
    steps, logs = SyncCounter(), SyncCounter()
    for name, counter in (("step", steps), ("_log", logs)):
        method = getattr(trainer.Trainer, name)

        def counted(self, *args, method=method, counter=counter):
            with counter:
                return method(self, *args)

        monkeypatch.setattr(trainer.Trainer, name, counted)
    return steps, logs


@pytest.mark.parametrize(
    "case",
    ["classify-padded", "classify-weighted", "classify-no-padding", "instruct-padded", "instruct-packed"],
)
def test_a_step_reads_nothing_back_and_a_log_window_once(base, tmp_path, monkeypatch, case):
    task, kind = case.split("-", 1)
    words = ["abcd", "efgh", "ijkl", "mnop"] if kind == "no-padding" else WORDS  # one token a byte
    if task == "classify":
        rows = [{"text": w, "label": w[0]} for w in words] * 4
        extra = {"class_weights": "inverse_freq"} if kind == "weighted" else {}
    else:
        rows = [{"instruction": f"Repeat {w}.", "response": f"{w} {w}"} for w in words] * 4
        extra = {"task": "instruct", "packing": kind == "packed", "max_seq_len": 128}
    helpers.write_jsonl(tmp_path / "data.jsonl", rows)
    steps, logs = _count(monkeypatch)
    nibble.train(
        dict(
            model=str(base),
            data=str(tmp_path / "data.jsonl"),
            output=str(tmp_path / "out"),
            max_steps=STEPS,
            log_every=LOG_EVERY,
            batch_size=4,
            grad_accum=2,
            save_every=0,
            eval_every=0,
            val_split=0,
            **extra,
        )
    )
    assert dict(steps.counts) == {}  # the allowlist inside a step: empty
    assert (steps.total + logs.total) / STEPS <= 0.2

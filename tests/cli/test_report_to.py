"""``nibble train --report-to tensorboard,wandb``: the records of metrics.jsonl reach TensorBoard's event files and
an offline W&B run, read back with TensorBoard's own reader and W&B's own record schema."""

from __future__ import annotations

import json

import pytest

import helpers
from nibble.cli.main import main


def wandb_history(run_file):
    """The history rows of a W&B run file (a leveldb-style log of ``wandb_internal_pb2.Record`` messages:
    a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_metrics_reach_tensorboard_and_an_offline_wandb_run(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3")
    rows = [{"text": w, "label": w[0]} for w in ("apple", "berry", "avocado", "banana")] * 5
    helpers.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", path, "--data", tmp_path / "d.jsonl", "--output", out, "--log-every", 1]
    args += ["--eval-every", 2, "--save-every", 2, "--val-split", 0.2, "--report-to", "tensorboard,wandb"]
    assert main([str(a) for a in [*args, "--max-steps", 4]]) == 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {
        (f"{r['kind']}/{key}", r["step"]): value
        for r in records
        for key, value in r.items()
        if key not in ("kind", "step")
    }
    assert ("train/loss", 4) in expected and ("eval/accuracy", 2) in expected

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    board = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert board.keys() == expected.keys()
    assert list(board.values()) == pytest.approx([expected[k] for k in board], rel=1e-6)  # stored as float32

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{(out / 'wandb' / 'run_id').read_text().strip()}.wandb"
    logged = {(key, row["step"]): value for row in wandb_history(run_file) for key, value in row.items() if "/" in key}
    assert logged == pytest.approx(expected)

    # Resumed from step 2 and extended: TensorBoard holds each step once (the replayed steps 3-4 replace the
    # first run's), and the W&B run goes on under its id.
    assert main([str(a) for a in [*args, "--max-steps", 6, "--resume", out / "checkpoints" / "step-2"]]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    ids = {p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")}
    assert ids == {(out / "wandb" / "run_id").read_text().strip()}


def test_an_unknown_or_missing_target_is_one_line(tmp_path, capsys):
    args = ["train", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"), "--report-to", "mlflow"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "error: 'report_to': unknown target 'mlflow'; use none, or one or more of tensorboard, wandb\n"
    )


@pytest.mark.parametrize(("target", "package"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_target_that_fails_to_import_is_one_line_and_leaves_nothing(target, package, tmp_path, monkeypatch, capsys):
    """A broken install (raising something other than ImportError on import) is refused before the output
    directory exists, so the next run there is not refused as "already holds a run"."""
    import sys

    broken = tmp_path / "site" / package
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise TypeError('Descriptors cannot be created directly.\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m.split(".")[0] == package or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3")
    helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": w, "label": w[0]} for w in ("apple", "berry")] * 4)
    out = tmp_path / "run"
    args = ["train", "--model", path, "--data", tmp_path / "d.jsonl", "--output", out, "--report-to", target]
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    assert capsys.readouterr().err == (
        f"error: 'report_to': {target} is installed but fails to import (TypeError: Descriptors cannot be created "
        f"directly.); reinstall it (pip install --force-reinstall {target}), or drop it\n"
    )
    assert not out.exists()


def test_a_target_that_fails_to_start_is_one_line_and_the_run_goes_on_with_resume(tmp_path, monkeypatch, capsys):
    from nibble.train import report

    def failing(out, config, resumed_at):
        raise PermissionError("[Errno 13] Permission denied: 'events'\nmore")

    monkeypatch.setitem(report._REPORTERS, "tensorboard", failing)
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3")
    helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": w, "label": w[0]} for w in ("apple", "berry")] * 4)
    out = tmp_path / "run"
    args = ["train", "--model", path, "--data", tmp_path / "d.jsonl", "--output", out, "--max-steps", 1]
    capsys.readouterr()
    assert main([str(a) for a in [*args, "--report-to", "tensorboard"]]) == 2
    assert capsys.readouterr().err == (
        "error: 'report_to': tensorboard failed to start (PermissionError: [Errno 13] Permission denied: 'events'); "
        "fix that or drop it, then run again with --resume\n"
    )
    assert main([str(a) for a in [*args, "--resume"]]) == 0 and (out / "adapter").is_dir()

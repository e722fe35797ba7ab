"""Checkpoints are verified before they are trusted (a manifest of sizes and SHA-256), resuming from any of
them reproduces the uninterrupted run's weights and metrics lines, and a bad checkpoint state is one line."""

import contextlib
import hashlib
import json

import pytest
import torch

from nibble.errors import NibbleError
from nibble.train import TrainConfig
from nibble.train.checkpoint import list_checkpoints
from nibble.train.outdir import check_output
from train.test_trainer import make_trainer, weights


def metric_lines(out):
    """metrics.jsonl without the timing field, which differs between any two runs."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_rss_bytes", "peak_device_bytes")} for r in lines
    ]


def evaluate(model):
    return {"loss": float(model.score.weight.abs().sum()), "accuracy": 0.5}


def test_the_manifest_holds_the_size_and_sha256_of_every_file(tmp_path):
    from nibble.train.checkpoint import MANIFEST, verify_checkpoint

    trainer, _ = make_trainer(tmp_path, total=4)
    trainer.train()
    path = tmp_path / "checkpoints" / "step-4"
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    assert sorted(manifest) == on_disk and "trainable.safetensors" in on_disk and "state.json" in on_disk
    for name, entry in manifest.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    verify_checkpoint(path)


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: the file still parses, only the values change
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: flip_last_byte(p / "trainable.safetensors"), r"trainable.safetensors: SHA-256 differs"),
        (lambda p: (p / "optimizer.safetensors").write_bytes(b"x"), r"optimizer.safetensors: 1 bytes, the manif"),
        (lambda p: (p / "rng.safetensors").unlink(), r"rng.safetensors: missing from the checkpoint"),
        (lambda p: (p / "manifest.json").unlink(), r"manifest.json: missing"),
        (lambda p: (p / "manifest.json").write_text('{"files": [1]}'), r"manifest.json: garbled manifest"),
    ],
    ids=["flipped-byte", "truncated", "missing-file", "no-manifest", "garbled-manifest"],
)
def test_a_damaged_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, damage, message):
    from nibble.train.checkpoint import newest_intact_checkpoint, verify_checkpoint

    trainer, _ = make_trainer(tmp_path, total=8)
    trainer.train()
    newest = tmp_path / "checkpoints" / "step-8"
    damage(newest)
    with pytest.raises(NibbleError, match=message) as exc:
        verify_checkpoint(newest)
    assert "\n" not in str(exc.value)
    found, skipped = newest_intact_checkpoint(tmp_path / "checkpoints")
    assert found == tmp_path / "checkpoints" / "step-4"
    assert [p for p, _ in skipped] == [newest] and skipped[0][1] == str(exc.value)
    resumed, _ = make_trainer(tmp_path, total=8)
    with pytest.raises(NibbleError, match=message):  # --resume PATH to the damaged one: one line, the file
        resumed.resume(newest)


def test_a_flipped_weight_is_not_resumed_from(tmp_path):
    # Before manifests, a bit flipped inside the tensor data loaded silently and the run went on from it.
    reference, model_ref = make_trainer(tmp_path / "ref", total=8)
    reference.train()
    trainer, _ = make_trainer(tmp_path / "run", total=8)
    trainer.train()
    flip_last_byte(tmp_path / "run" / "checkpoints" / "step-8" / "trainable.safetensors")
    found = check_output(tmp_path / "run", TrainConfig(resume="latest"))  # what `nibble train --resume` picks
    assert found == tmp_path / "run" / "checkpoints" / "step-4"
    resumed, model = make_trainer(tmp_path / "run", total=8)
    resumed.resume(found)
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]  # the damaged one is gone
    resumed.train()
    for key, value in weights(model_ref).items():
        assert torch.equal(value, weights(model)[key]), key


@pytest.mark.parametrize("stop_at", [3, 6, 8])
def test_resuming_from_any_step_repeats_the_same_metrics_lines(tmp_path, stop_at):
    # log every 4 steps, evaluate every 3, checkpoint every 3 and at the end: resuming at step 3 or 6 (inside a
    # log window) and at 8 (the end, already evaluated) must log exactly what the uninterrupted run logged.
    options = dict(total=8, evaluate=evaluate, log_every=4, eval_every=3, save_every=3)
    reference, model_ref = make_trainer(tmp_path / "ref", **options)
    reference.train()
    first, _ = make_trainer(tmp_path / "run", **options)
    first.train()
    checkpoint = dict(list_checkpoints(tmp_path / "run" / "checkpoints"))[stop_at]
    resumed, model = make_trainer(tmp_path / "run", **options)
    resumed.resume(checkpoint)
    resumed.train()
    assert metric_lines(tmp_path / "run") == metric_lines(tmp_path / "ref")
    assert resumed.last_eval == reference.last_eval
    for key, value in weights(model_ref).items():
        assert torch.equal(value, weights(model)[key]), key


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s["progress"].update(step="3"), r"progress 'step' is '3'"),
        (lambda s: s["progress"].update(stopped_early=1), r"progress 'stopped_early' is 1"),
        (lambda s: s["progress"].update(bogus=1), r"progress 'bogus'"),
        (lambda s: s.update(progress=[]), r"'progress' must be an object"),
        (lambda s: s.update(data="x"), r"incomplete checkpoint state"),
        (lambda s: s["data"].update(position=-4), r"data position -4 is not a step count"),
        (
            lambda s: s.update(window={"first_step": 1, "losses": ["a"], "grad_norms": [1], "lr": 0, "tokens": 0}),
            r"incomplete checkpoint state",
        ),  # fmt: skip
        (lambda s: s["rng"]["numpy"].update(pos="x"), r"'rng' is not a generator state"),
        (lambda s: s["rng"]["numpy"].update(pos=10**6), r"'rng' is not a generator state"),  # numpy: SIGSEGV
        (lambda s: s["optimizer_groups"][0].update(betas=[0.9, "x"]), r"optimizer_groups\[0\] 'betas'"),
        (lambda s: s["optimizer_groups"][0].update(eps=-1.0), r"optimizer_groups\[0\] 'eps' is -1.0"),
        (lambda s: s["optimizer_groups"][0].update(params=["score.bias"]), r"lists other parameters"),
        (lambda s: s["optimizer_groups"].pop(), r"must be a list of 2 groups"),
        (lambda s: s["data"].update(position=7), r"data position 7 is not step 4 x 1 micro-batches"),
        (lambda s: s["scheduler"].update(step=2), r"not the warmup\+cosine schedule at step 4"),
    ],
)
def test_a_bad_checkpoint_state_is_one_line(tmp_path, change, message):
    trainer, _ = make_trainer(tmp_path, total=4)
    trainer.train()
    path = tmp_path / "checkpoints" / "step-4"
    state = json.loads((path / "state.json").read_text())
    change(state)
    (path / "state.json").write_text(json.dumps(state))
    (path / "manifest.json").unlink(missing_ok=True)  # the damage is in the content, not in transit:
    with contextlib.suppress(ImportError):
        from nibble.train.checkpoint import write_manifest

        write_manifest(path)
    resumed, _ = make_trainer(tmp_path, total=4)
    with pytest.raises(NibbleError, match=message) as exc:
        resumed.resume(path)
    assert "\n" not in str(exc.value)


def test_a_reshaped_optimizer_moment_is_one_line_naming_it(tmp_path):
    # The manifest recomputed, so the bytes are "intact": exp_avg reshaped to (3, 5) reached the fused AdamW kernel
    # and corrupted the heap (free(): invalid next size, SIGSEGV) before its shape was checked.
    from safetensors.torch import load_file, save_file

    from nibble.train.checkpoint import write_manifest

    trainer, _ = make_trainer(tmp_path, total=4)
    trainer.train()
    path = tmp_path / "checkpoints" / "step-4"
    tensors = load_file(path / "optimizer.safetensors")
    tensors["embed.weight.exp_avg"] = torch.zeros(3, 5)
    save_file(tensors, path / "optimizer.safetensors")
    write_manifest(path)
    resumed, model = make_trainer(tmp_path, total=8)
    before = weights(model)
    with pytest.raises(NibbleError, match=r"optimizer.safetensors: 'embed.weight.exp_avg' has shape \(3, 5\)"):
        resumed.resume(path)
    assert all(torch.equal(v, weights(model)[k]) for k, v in before.items())  # nothing was taken from it

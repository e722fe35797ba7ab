"""What ``nibble train`` guarantees around its output directory, end to end on a tiny Qwen3: one run at a time
(two real processes), Ctrl-C and SIGTERM (real signals) checkpoint and say how to resume, --resume skips a
damaged checkpoint, --overwrite keeps the old run until the new one has a checkpoint, a failed write (full
disk, file-size limit) is one line that leaves the previous checkpoint intact and nothing half-written."""

import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import helpers
from nibble.cli.main import main

WORDS = {"neg": ["bad", "awful", "sad"], "pos": ["good", "great", "nice"]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    data = helpers.write_word_rows(root / "train.jsonl", WORDS, 48, seed=0)
    return SimpleNamespace(root=root, base=base, data=data)


def train_args(toy, out, *extra):
    args = ["train", "--model", toy.base, "--data", toy.data, "--output", out, "--batch-size", "4", "--lr", "5e-3"]
    args += ["--val-split", "0", "--eval-every", "0", "--log-every", "1", "--method", "lora"]
    return [str(a) for a in [*args, *extra]]


def spawn(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nibble", *args], env=env, text=True, **kwargs)


def wait_for(condition, process, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric_count(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def checkpoint_steps(out):
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))


def litter(out):
    """Temporary names a write leaves while it is under way."""
    return [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def verified(out):
    from nibble.train.checkpoint import verify_checkpoint

    for step in checkpoint_steps(out):
        verify_checkpoint(out / "checkpoints" / f"step-{step}")
    return True


def without_progress(err: str) -> str:
    """stderr without the progress lines a run prints when stderr is not a terminal."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("step "))


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(toy, tmp_path, capsys):
    out = tmp_path / "run"
    first = spawn(train_args(toy, out, "--max-steps", "100000", "--save-every", "5"), stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: metric_count(out) >= 2, first, "the first steps")
        # this test's own process is the second one: a fresh run, and a resume
        for extra in ([], ["--resume"]):
            assert main([*train_args(toy, out, "--max-steps", "3"), *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"another nibble run (pid {first.pid}) is using this output" in err, err
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.kill()
        first.wait()
    # SIGKILL left no stale lock: the directory can be taken at once.
    from nibble.io.lock import locked_directory

    with locked_directory(out):
        pass
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, none twice


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_prints_the_resume_command(toy, tmp_path, capsys, sig):
    out = tmp_path / "run"
    run = spawn(train_args(toy, out, "--max-steps", "100000", "--save-every", "1000"), stderr=subprocess.PIPE)
    wait_for(lambda: metric_count(out) >= 2, run, "the first steps")
    run.send_signal(sig)
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 128 + sig, err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+); resume with: (.*)", last)
    assert match, err
    step = int(match.group(1))
    assert checkpoint_steps(out) == [step] and verified(out) and not litter(out)
    command = shlex.split(match.group(2))
    assert command[:3] == [sys.executable, "-m", "nibble"] and command[-1] == "--resume"
    assert command[3:-1] == train_args(toy, out, "--max-steps", "100000", "--save-every", "1000")
    if sig == signal.SIGTERM:
        return  # one continuation suffices
    # The printed command continues the run (here in this process, for two more steps).
    assert main([*command[3:], "--max-steps", str(step + 2)]) == 0
    assert f"resumed from {out / 'checkpoints' / f'step-{step}'} at step {step}" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def paused(phase, occurrence, args):
    """A run that pauses the ``occurrence``-th time it reaches ``phase`` (see tests/pausing_nibble.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(PAUSING), phase, str(occurrence), *args]
    return subprocess.Popen(command, env=env, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def wait_for_line(process, text, timeout=120):
    """Read ``process``'s stderr until a line holding ``text``; returns what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        assert line, f"the run ended before '{text}': {''.join(seen)}"
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"timed out waiting for '{text}'")


PAUSING = Path(__file__).resolve().parents[1] / "pausing_nibble.py"


def test_a_second_signal_stops_at_once_leaving_only_complete_checkpoints(toy, tmp_path):
    out = tmp_path / "run"
    run = paused("stopsave", 1, train_args(toy, out, "--max-steps", "100000", "--save-every", "2"))
    wait_for(lambda: (out / "checkpoints").is_dir() and checkpoint_steps(out), run, "a checkpoint")
    run.send_signal(signal.SIGTERM)
    wait_for_line(run, "paused in stopsave")  # the first signal's checkpoint is being written
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: stopped at once by a second signal"), err
    assert checkpoint_steps(out) and verified(out) and not litter(out) and not (out / "adapter").exists()


def test_resume_skips_a_damaged_checkpoint_and_resume_path_names_the_bad_file(toy, tmp_path, capsys):
    out, ref = tmp_path / "run", tmp_path / "ref"
    common = ("--max-steps", "6", "--save-every", "2")
    assert main(train_args(toy, ref, *common)) == 0
    assert main(train_args(toy, out, *common)) == 0
    weights = out / "checkpoints" / "step-6" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*train_args(toy, out, *common), "--resume", str(weights.parent)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {weights}: SHA-256 differs from the manifest; the checkpoint is damaged\n"
    assert main([*train_args(toy, out, *common), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resume: skipping {weights.parent}: {weights}: SHA-256 differs" in printed
    assert f"resumed from {out / 'checkpoints' / 'step-4'} at step 4" in printed
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (ref / adapter).read_bytes()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--max-steps", "2")) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # The new run fails (the loss overflows) before its first checkpoint: the old run must survive whole.
    failing = ("--max-steps", "20", "--save-every", "0", "--lr", "1e30", "--warmup-ratio", "0", "--max-grad-norm", "0")
    assert main(train_args(toy, out, *failing, "--overwrite")) == 2
    assert "(not finite)" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # Once the new run has a checkpoint the old one is gone; a finished run leaves nothing aside.
    assert main(train_args(toy, out, "--max-steps", "3", "--overwrite")) == 0
    assert checkpoint_steps(out) == [3] and [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [
        1,
        2,
        3,
    ]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".nibble-outputs.json"]


def tree(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_overwrite_removes_only_what_nibble_wrote_and_never_a_path_the_run_reads(toy, tmp_path, capsys):
    import shutil

    # A project directory holding the run's own --model and a hand-written config.yaml: --overwrite lost both.
    proj = tmp_path / "proj"
    shutil.copytree(toy.base, proj / "model")
    (proj / "config.yaml").write_text("max_steps: 2\n")
    before = tree(proj)
    args = ["train", str(proj / "config.yaml"), *train_args(toy, proj, "--overwrite")[1:]]
    args[args.index("--model") + 1] = str(proj / "model")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "which nibble did not write there" in err and err.count("\n") == 1
    assert tree(proj) == before
    # A user's file beside a run of nibble's: refused, nothing removed.
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--max-steps", "2")) == 0
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    assert main(train_args(toy, out, "--max-steps", "2", "--overwrite")) == 2
    assert "'notes.txt' is not a file nibble wrote" in capsys.readouterr().err and tree(out) == before
    (out / "notes.txt").unlink()
    # Data, validation data or a config file read from inside the old run's outputs: refused by name.
    shutil.copy(toy.data, out / "adapter" / "rows.jsonl")
    (out / "adapter" / "run.yaml").write_text("max_steps: 2\n")
    before = tree(out)
    rows = out / "adapter" / "rows.jsonl"
    for extra, named in (
        (["--data", rows], f"--data {rows}"),
        (["--val-data", rows], f"--val-data {rows}"),
        ([], f"the config file {out / 'adapter' / 'run.yaml'}"),
    ):
        args = train_args(toy, out, "--overwrite", *extra)
        if not extra:
            args.insert(1, str(out / "adapter" / "run.yaml"))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{named} is read from it" in err and err.count("\n") == 1, err
        assert tree(out) == before
    (out / "adapter" / "rows.jsonl").unlink()
    (out / "adapter" / "run.yaml").unlink()
    # What nibble wrote is replaced as before.
    assert main(train_args(toy, out, "--max-steps", "3", "--overwrite")) == 0
    assert checkpoint_steps(out) == [3]


def test_overwrite_killed_before_its_first_checkpoint_gives_the_old_run_back(toy, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(toy, out, "--max-steps", "2")) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    run = spawn(train_args(toy, out, "--max-steps", "100000", "--save-every", "0", "--overwrite"))
    wait_for(lambda: (out / ".replaced").is_dir() and metric_count(out) >= 1, run, "the new run's first step")
    run.kill()
    run.wait()
    assert not (out / "adapter").exists()  # set aside, not deleted
    # The next run on the directory (here: a refused one) puts the old run back first.
    assert main(train_args(toy, out, "--max-steps", "2")) == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_overwrite_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "moved aside" in text and "first checkpoint" in text


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(toy, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    real_save = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 5:  # the second checkpoint's optimizer state (three files per checkpoint)
            Path(filename).write_bytes(b"\0" * 100)  # what the disk took before it was full
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(train_args(toy, out, "--max-steps", "6", "--save-every", "2")) == 2
    err = without_progress(capsys.readouterr().err)
    assert re.fullmatch(
        rf"error: {re.escape(str(out / 'checkpoints'))}: no space left on the device \([\d.]+ [KMG]iB free, "
        r"about [\d.]+ KiB needed\); free some space or write elsewhere\n",
        err,
    ), err
    assert checkpoint_steps(out) == [2] and verified(out) and not litter(out)
    assert not (out / "adapter").exists()


def test_a_kernel_write_failure_is_one_line_and_leaves_nothing_half_written(toy, tmp_path):
    # A real OSError from the kernel: the file-size limit (EFBIG) stops the checkpoint's optimizer state.
    out = tmp_path / "run"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    run = spawn(train_args(toy, out, "--max-steps", "2"), stderr=subprocess.PIPE, preexec_fn=limit_file_size)
    err = without_progress(run.communicate(timeout=300)[1])
    assert run.returncode == 2, err
    assert err.startswith(f"error: {out / 'checkpoints'}: cannot write (File too large; ") and err.count("\n") == 1
    assert "needed); check the directory or write elsewhere" in err
    assert not (out / "checkpoints").exists() or checkpoint_steps(out) == []
    assert not litter(out)

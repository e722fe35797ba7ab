"""A run's output directory: what may be written there, resuming from it (which checkpoint, whether anything is
left to do, the micro-batch that keeps the checkpoint's global batch), and ``--overwrite``'s set-aside.

``--overwrite`` moves the previous run's outputs into ``OUT/.replaced`` and deletes them only once the new run
has written its first checkpoint; a new run that stops before that gives them back (:func:`settle_replaced_run`).
It touches only what nibble wrote there, as ``OUT/.nibble-outputs.json`` records, and never a path the run reads:
a directory holding anything else, or a path the run reads inside what it would remove, is refused first.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from nibble.errors import NibbleError
from nibble.io.files import read_json_object, remove_stale_staging, write_text_atomic
from nibble.io.lock import LOCK_NAME
from nibble.io.runinfo import RUN_INFO, RunInfo
from nibble.train import distributed
from nibble.train.checkpoint import (
    discard_checkpoints_after,
    list_checkpoints,
    newest_intact_checkpoint,
    read_state,
    verify_checkpoint,
)
from nibble.train.config import TrainConfig, field_names, read_yaml
from nibble.train.optim import WarmupCosine
from nibble.train.progress import read_progress

RUN_OUTPUTS = (
    "adapter",
    "model",
    "best",
    "checkpoints",
    "plots",
    "metrics.jsonl",
    "eval_report.json",
    "config.yaml",
    "tensorboard",
    "wandb",
)
# Where --overwrite keeps the previous run until the new one has written a checkpoint; ".replacing" while
# the previous run's outputs are being moved there.
REPLACED, REPLACING = ".replaced", ".replacing"
# The names of RUN_OUTPUTS that nibble wrote in the directory: all --overwrite may remove.
WRITTEN = ".nibble-outputs.json"
_BOOKKEEPING = (LOCK_NAME, WRITTEN, REPLACED, REPLACING)


# What a resumed run may change: the step budget, the cadences, the reporting, and where and how it runs (the
# global batch a different number of ranks keeps is checked by the data position). Every other key of the
# checkpoint's config.yaml defines the run (FIXED_ON_RESUME) and must stay as it was; the model is compared by its
# content (see nibble.io.files.model_fingerprint), not by its path.
MAY_CHANGE_ON_RESUME = (
    *("max_steps", "epochs"),
    *("log_every", "eval_every", "save_every", "keep_checkpoints", "early_stopping_patience", "eval_at_start"),
    "report_to",
    *("output", "resume", "overwrite", "config_file", "device", "dist_backend", "batch_size", "eval_batch_size"),
    *("memory_budget", "cache_budget_mb", "compile", "deterministic", "gradient_checkpointing", "shard_base"),
)
FIXED_ON_RESUME = tuple(name for name in field_names() if name not in MAY_CHANGE_ON_RESUME)


def check_same_run(checkpoint: Path, config: TrainConfig, fingerprint: str) -> None:
    """Refuse to resume ``checkpoint`` as a different run: every key of :data:`FIXED_ON_RESUME` must have the
    value the checkpoint's own resolved config.yaml records, and the model the content it was trained on
    (``fingerprint``; state.json's ``identity``).

    Raises:
        NibbleError: the first key that changed, naming it and both values.
    """
    saved = read_yaml(checkpoint / "config.yaml")
    identity = read_state(checkpoint).get("identity")
    mine = config.to_dict()
    for key in FIXED_ON_RESUME:
        if key == "model" and isinstance(identity, dict) and "model" in identity:
            if identity["model"] != fingerprint:
                raise NibbleError(
                    f"--resume {checkpoint}: the model {config.model} is not the one the run was trained on "
                    f"({saved.get('model')}, other content); resume with that model, or start a new run"
                )
            continue
        if key in saved and _comparable(key, saved[key]) != _comparable(key, mine[key]):
            raise NibbleError(
                f"--resume {checkpoint}: '{key}' was {saved[key]!r}, now {mine[key]!r}; a resumed run keeps it "
                f"(only {', '.join(MAY_CHANGE_ON_RESUME[:9])}, ... may change); drop the change or start a new run"
            )


def _comparable(key: str, value: object) -> object:
    """A path-valued key resolved (``./d.jsonl`` and ``d.jsonl`` are the same data), any other value as it is."""
    return Path(value).resolve() if key in ("data", "val_data", "chat_template") and isinstance(value, str) else value


def check_output(out: Path, config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (or None), after checking that ``out`` may be written. ``--resume``
    takes the newest checkpoint whose files match its manifest, naming each newer one it skips."""
    if config.resume:
        if config.resume != "latest":
            path = Path(config.resume)
            if not path.is_dir():
                raise NibbleError(f"--resume {path}: no such checkpoint directory")
            verify_checkpoint(path)  # before anything, even a finished run's "nothing to do", relies on it
            return path
        found, skipped = newest_intact_checkpoint(out / "checkpoints")
        for path, reason in skipped:
            print(f"resume: skipping {path}: {reason}", flush=True)
        if found is None:
            print(f"resume: no intact checkpoint under {out / 'checkpoints'}; starting from step 0", flush=True)
        return found
    written = written_outputs(out)
    existing = [name for name in RUN_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    foreign = [name for name in existing if name not in written]
    if foreign:
        raise NibbleError(
            f"{out}: holds '{foreign[0]}', which nibble did not write there (not in {WRITTEN}); move it out of "
            "the directory or choose another --output (nothing was removed)"
        )
    if existing and not config.overwrite:
        raise NibbleError(
            f"{out}: already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output"
        )
    if existing:
        _check_overwrite(out, existing, config)
    return None


def written_outputs(out: Path) -> list[str]:
    """The names of run outputs nibble wrote in ``out`` (its :data:`WRITTEN` record; empty without one).

    Raises:
        NibbleError: the record is garbled.
    """
    if not (out / WRITTEN).is_file():
        return []
    names = read_json_object(out / WRITTEN, "delete it and move the run's files out by hand").get("written")
    if not isinstance(names, list) or not all(name in RUN_OUTPUTS for name in names):
        raise NibbleError(f"{out / WRITTEN}: garbled record of nibble's outputs; delete it and move the files by hand")
    return names


def _check_overwrite(out: Path, removed: list[str], config: TrainConfig) -> None:
    """``--overwrite`` may remove ``removed``: the directory holds nothing else (but nibble's own bookkeeping), and
    no path the run reads (--model, --data, --val-data, the config file, the chat template) lies inside them.

    Raises:
        NibbleError: the first foreign entry, or the first path read, naming it; nothing was removed.
    """
    for entry in sorted(out.iterdir()):
        stale = entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name)
        if entry.name not in (*RUN_OUTPUTS, *_BOOKKEEPING) and not stale:
            raise NibbleError(
                f"{out}: --overwrite replaces a run's directory, and '{entry.name}' is not a file nibble wrote "
                "there; move it out of the directory or choose another --output (nothing was removed)"
            )
    reads = {key: getattr(config, key) for key in ("model", "data", "val_data", "config_file", "chat_template")}
    for key, value in reads.items():
        if not value:
            continue
        read = Path(value).resolve()
        for name in removed:
            target = (out / name).resolve()
            if read == target or target in read.parents:
                flag = "the config file" if key == "config_file" else f"--{key.replace('_', '-')}"
                raise NibbleError(
                    f"{out}: --overwrite would remove {out / name}, and {flag} {value} is read from it; "
                    "move it out of the output directory or choose another --output (nothing was removed)"
                )


def record_outputs(out: Path) -> None:
    """Record in ``out`` that the run output names there are nibble's (see :data:`WRITTEN`): written before any of
    them, once :func:`check_output` found none that is not."""
    write_text_atomic(out / WRITTEN, json.dumps({"written": list(RUN_OUTPUTS)}) + "\n")


def prepare_output(out: Path, config: TrainConfig, resume_from: Path | None) -> None:
    """Make ``out`` ready for the run (rank 0 only): the previous run set aside (``--overwrite``), or what a run
    killed before its first checkpoint left removed (``--resume`` with nothing intact), an export cut short by a
    kill removed, and the resolved config written."""
    if not config.resume:
        _set_previous_run_aside(out)
    elif resume_from is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        discard_checkpoints_after(out / "checkpoints", -1)
    remove_stale_staging(out)
    out.mkdir(parents=True, exist_ok=True)
    record_outputs(out)
    config.save(out / "config.yaml")


def drop_replaced_run(out: Path) -> None:
    """Delete what ``--overwrite`` set aside: the new run has a checkpoint now."""
    shutil.rmtree(out / REPLACED, ignore_errors=True)


def _remove_outputs(out: Path) -> None:
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _set_previous_run_aside(out: Path) -> None:
    """``--overwrite``: move the previous run's outputs into ``OUT/.replaced``, where they stay until the new
    run has written its first checkpoint (see :func:`settle_replaced_run`)."""
    existing = [name for name in written_outputs(out) if (out / name).exists() or (out / name).is_symlink()]
    if not existing:
        return
    moving = out / REPLACING
    moving.mkdir()
    for name in existing:
        os.rename(out / name, moving / name)
    os.rename(moving, out / REPLACED)


def _move_back(aside: Path, out: Path) -> None:
    for item in aside.iterdir():
        os.rename(item, out / item.name)
    aside.rmdir()


def settle_replaced_run(out: Path) -> None:
    """Finish or undo what ``--overwrite`` set aside in ``out``: once the new run has a checkpoint the previous
    run is deleted; a new run that stopped before that (failed, interrupted, killed) gives it back."""
    if (out / REPLACING).is_dir():  # stopped while moving: only the previous run's outputs exist
        _move_back(out / REPLACING, out)
        print(f"{out}: restored the previous run (a --overwrite run stopped before writing anything)", flush=True)
    aside = out / REPLACED
    if not aside.is_dir():
        return
    if list_checkpoints(out / "checkpoints"):
        shutil.rmtree(aside)
        return
    _remove_outputs(out)
    _move_back(aside, out)
    print(f"{out}: restored the previous run (the --overwrite run stopped before its first checkpoint)", flush=True)


def finished_already(out: Path, final: Path, checkpoint: Path, total_steps: int, config: TrainConfig) -> bool:
    """Whether resuming from ``checkpoint`` has nothing to do: the run there is finished for ``total_steps``
    and its export is from that step. Prints what resuming will do."""
    progress, schedule_steps = read_progress(checkpoint)
    lifted = progress.apply_patience(config.early_stopping_patience)
    if progress.finished(total_steps):
        exported = RunInfo.load(final / RUN_INFO).step if (final / RUN_INFO).is_file() else None
        if exported != progress.step:
            print(f"resume: {checkpoint} ends the run; exporting it", flush=True)
            return False
        if progress.stopped_early:
            print(
                f"{out}: the run stopped early at step {progress.step} (val loss not lower for "
                f"{progress.evals_without_improvement} evaluations; best at step {progress.best_step}); nothing to "
                "do. To train on, resume with a larger --early-stopping-patience (or 0)",
                flush=True,
            )
        elif progress.step > total_steps:
            print(
                f"{out}: the run is at step {progress.step}, already past the {total_steps} steps asked; nothing to "
                f"do (a resumed run never goes back: to train {total_steps} steps, start a new run in another "
                "--output)",
                flush=True,
            )
        else:
            print(
                f"{out}: the run is finished at step {progress.step} of {total_steps}; nothing to do. To train on, "
                f"resume with a --max-steps above {total_steps}",
                flush=True,
            )
        return True
    if lifted:
        print(
            f"resume: the early stop at step {progress.step} no longer holds with --early-stopping-patience "
            f"{config.early_stopping_patience}; training on",
            flush=True,
        )
    if schedule_steps is not None and schedule_steps != total_steps:
        schedule = WarmupCosine(total_steps, config.warmup_ratio, config.min_lr_ratio)
        change = "extending" if total_steps > schedule_steps else "shortening"
        print(
            f"resume: {change} the run from {schedule_steps} to {total_steps} steps; the warmup+cosine schedule "
            f"is recomputed for {total_steps} steps, so step {progress.step + 1} trains at lr "
            f"{config.lr * schedule.factor(progress.step):.3g}",
            flush=True,
        )
    return False


def global_micro_batch(
    config: TrainConfig, resume_from: Path | None, part: distributed.Parallel, rows_per_example: int = 1
) -> TrainConfig:
    """The config with the per-rank ``batch_size`` a resumed run needs to keep the global micro-batch (per-rank
    batch x ranks) its checkpoint was trained with, whatever the number of ranks now (an elastic resume). The
    checkpoint counts examples; ``batch_size`` counts rows, ``rows_per_example`` of them per example.

    Raises:
        NibbleError: the checkpoint's global micro-batch does not split evenly over this many ranks.
    """
    if resume_from is None:
        return config
    saved = read_state(resume_from).get("data", {}).get("batch_size")
    if isinstance(saved, int):
        saved *= rows_per_example
    if not isinstance(saved, int) or saved == config.batch_size * part.world:
        return config
    if saved % part.world:
        raise NibbleError(
            f"{resume_from}: trained with {saved} rows per global micro-batch, which {part.world} ranks cannot "
            f"share evenly; resume on a number of ranks that divides {saved}, with --batch-size {saved} // ranks"
        )
    print(
        f"resume: {resume_from} was trained with {saved} rows per global micro-batch; "
        + (f"each of the {part.world} ranks now takes" if part.world > 1 else "the one process now takes")
        + f" --batch-size {saved // part.world}",
        flush=True,
    )
    return replace(config, batch_size=saved // part.world)

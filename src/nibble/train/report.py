"""``--report-to``: every metrics.jsonl record mirrored to TensorBoard and/or Weights & Biases, through their own
writers. metrics.jsonl stays the source of truth (plots and resume read it); the mirrors are for watching.

Each record becomes scalars named ``{kind}/{key}`` (``train/loss``, ``train/lr``, ``eval/accuracy``, ...) at
the record's optimizer step. TensorBoard event files go to ``OUT/tensorboard``; a resumed run drops the
events after its checkpoint's step (``purge_step``) so replayed steps are not drawn twice. W&B runs live in
``OUT/wandb`` (``WANDB_PROJECT``, default ``nibble``; ``WANDB_MODE=offline`` keeps them local); a resumed run
continues the same W&B run, its charts drawn against the ``step`` of each record.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from nibble.errors import NibbleError

TARGETS = ("tensorboard", "wandb")
_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # what each reporter imports


def report_targets(value: str) -> tuple[str, ...]:
    """The targets named by a ``report_to`` value: ``none``, or a comma-separated subset of TARGETS.

    Raises:
        NibbleError: an unknown name, or a target whose package is not installed.
    """
    names = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    if names == ("none",):
        return ()
    for name in names or (value,):
        if name not in TARGETS:
            raise NibbleError(f"'report_to': unknown target '{name}'; use none, or one or more of {', '.join(TARGETS)}")
        if importlib.util.find_spec(name) is None:
            raise NibbleError(
                f"'report_to': {name} is not installed; pip install {name} (or nibble[report]), or drop it"
            )
        try:  # imported now, before the run touches its output directory: a broken install is one line
            importlib.import_module(_MODULES[name])
        except Exception as exc:  # a package can fail to import in any way (a mismatched protobuf, numpy, ...)
            raise NibbleError(
                f"'report_to': {name} is installed but fails to import ({type(exc).__name__}: {_first_line(exc)}); "
                f"reinstall it (pip install --force-reinstall {name}), or drop it"
            ) from None
    return names


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "train")
    return {
        f"{kind}/{key}": value
        for key, value in record.items()
        if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class TensorBoardReporter:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` into ``OUT/tensorboard``."""

    def __init__(self, out: Path, config: dict[str, Any], resumed_at: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)
        if not resumed_at:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def write(self, record: dict[str, Any]) -> None:
        for name, value in _scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run (``wandb.init`` in ``OUT/wandb``; its id kept in ``OUT/wandb/run_id`` so a resume continues it)."""

    def __init__(self, out: Path, config: dict[str, Any], resumed_at: int):
        import wandb

        directory = out / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "run_id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed_at and id_file.is_file() else None
        project = os.environ.get("WANDB_PROJECT", "nibble")
        self.run = wandb.init(project=project, name=out.name, dir=str(out), id=run_id, resume="allow", config=config)
        id_file.write_text(self.run.id + "\n", encoding="utf-8")
        self.run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({"step": record["step"], **_scalars(record)})

    def close(self) -> None:
        self.run.finish()


_REPORTERS = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}


def open_reporters(targets: tuple[str, ...], out: Path, config: dict[str, Any], resumed_at: int) -> list:
    """One open reporter per target (each with ``write(record)`` and ``close()``); ``resumed_at`` is the step a
    resumed run continues from (0 for a new run).

    Raises:
        NibbleError: a target that fails to start (its library raised), naming it and the library's reason.
    """
    reporters = []
    for name in targets:
        try:
            reporters.append(_REPORTERS[name](out, config, resumed_at))
        except Exception as exc:  # the libraries fail in their own ways (a bad login, an unwritable directory)
            for reporter in reporters:
                reporter.close()
            raise NibbleError(
                f"'report_to': {name} failed to start ({type(exc).__name__}: {_first_line(exc)}); fix that or drop "
                f"it, then run again with --resume"
            ) from None
    return reporters


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]

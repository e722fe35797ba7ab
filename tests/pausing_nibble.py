"""``nibble`` with a pause at a chosen moment of a training run, so a test can signal or kill it exactly there.

usage: python tests/pausing_nibble.py PHASE N nibble-arguments...

The N-th time (1-based) the run reaches PHASE it prints ``paused in PHASE N`` on stderr and sleeps, in the
middle of that phase:
- ``step``: inside an optimizer step (its micro-batches done, the optimizer not yet stepped);
- ``save``: inside a checkpoint write, every file written but the manifest, not yet renamed into place;
- ``stopsave``: the same, for the first checkpoint written after a stop signal arrived;
- ``eval``: inside an evaluation, before its metrics are logged;
- ``best`` / ``export``: inside the export of ``best/`` / of the final ``adapter/`` (written, or copied from
  ``best/``), its files written, not yet renamed into place.
Nothing of nibble changes but the pause.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from nibble.cli.main import main
from nibble.train import checkpoint, export, interrupt, trainer


def pause_at(phase: str, occurrence: int) -> None:
    counts: dict[str, int] = {}
    stopping = []

    def reached(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        if name == phase and counts[name] == occurrence:
            print(f"paused in {phase} {occurrence}", file=sys.stderr, flush=True)
            time.sleep(3600)

    real_manifest = checkpoint.write_manifest

    def write_manifest(directory):
        reached("save")
        if stopping:
            reached("stopsave")
        return real_manifest(directory)

    checkpoint.write_manifest = write_manifest

    real_handle = interrupt.GracefulStop._handle

    def handle(self, signum, frame):
        stopping.append(signum)
        return real_handle(self, signum, frame)

    interrupt.GracefulStop._handle = handle

    real_step = trainer.Trainer.step

    def step(self):
        real_backward_step = self.optimizer.step

        def optimizer_step(*args, **kwargs):
            reached("step")
            return real_backward_step(*args, **kwargs)

        self.optimizer.step = optimizer_step
        try:
            return real_step(self)
        finally:
            del self.optimizer.step

    trainer.Trainer.step = step

    real_evaluate = trainer.Trainer._evaluate

    def evaluate(self):
        inner = self.evaluate

        def evaluating(model):
            metrics = inner(model)
            reached("eval")
            return metrics

        self.evaluate = evaluating
        try:
            return real_evaluate(self)
        finally:
            self.evaluate = inner

    trainer.Trainer._evaluate = evaluate

    real_save_adapter = export.save_adapter

    def save_adapter(model, directory, config):
        real_save_adapter(model, directory, config)
        reached("best" if directory.name.startswith(".best.") else "export")

    export.save_adapter = save_adapter

    real_copytree = shutil.copytree

    def copytree(source, target, **kwargs):  # the final adapter as a copy of best/ (the last evaluation was best)
        copied = real_copytree(source, target, **kwargs)
        if Path(target).name.startswith(".adapter."):
            reached("export")
        return copied

    shutil.copytree = copytree


if __name__ == "__main__":
    pause_at(sys.argv[1], int(sys.argv[2]))
    raise SystemExit(main(sys.argv[3:]))

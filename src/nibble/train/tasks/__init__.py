"""The training tasks: one module per task, one registry.

:data:`TASKS` maps a ``--task`` name to the class that implements it (``"module:Class"``, imported when first
used). Three ways in, looked up in this order:

- the built-in tasks below;
- an installed package's entry point in the group ``nibble.tasks`` (``toy = my_package.toy:ToyTask`` in its
  ``[project.entry-points."nibble.tasks"]``), so ``--task toy`` finds it;
- ``--task my_package.toy:ToyTask`` names a class directly (the module must be importable).

A task class satisfies :class:`nibble.train.tasks.base.Task`.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

from nibble.errors import NibbleError
from nibble.train.tasks.base import SavedModel, Task, TaskRun

TASKS: dict[str, str] = {
    "classify": "nibble.train.tasks.classify:ClassifyTask",
    "instruct": "nibble.train.tasks.instruct:InstructTask",
    "preference": "nibble.train.tasks.preference:PreferenceTask",
    "kto": "nibble.train.tasks.kto:KTOTask",
    "reward": "nibble.train.tasks.reward:RewardTask",
    "grpo": "nibble.train.tasks.grpo:GRPOTask",
}
ENTRY_POINTS = "nibble.tasks"


def task_names() -> dict[str, str]:
    """Every task ``--task`` can name: the built-in ones, then the installed entry points."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINTS)}
    return {**found, **TASKS}


@cache
def get_task(name: str) -> Task:
    """The task ``--task name`` selects (see the module docstring).

    Raises:
        NibbleError: no task of that name, or a ``module:Class`` that does not import or is not a task.
    """
    target = task_names().get(name, name)
    if ":" not in target:
        raise NibbleError(
            f"'task' {name!r} is not a task; use one of {', '.join(task_names())}, or module:Class for your own"
        )
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise NibbleError(f"'task' {name!r}: cannot import {target} ({exc}); check the module is on the path") from None
    task = cls()
    missing = [a for a in ("name", "head", "options", "check", "setup", "loss_memory") if not hasattr(task, a)]
    if missing:
        raise NibbleError(f"'task' {name!r}: {target} is not a task (it lacks {', '.join(missing)})")
    return task


def task_for_head(head: str) -> Task:
    """The built-in task that trains ``head``: what an adapter written by PEFT (no nibble.json) was trained for."""
    return next(task for task in map(get_task, TASKS) if task.head == head)


def data_viewer(name: str | None) -> Task:
    """The task whose rendering ``nibble data show`` prints: ``name``, or the first built-in task that can show
    its data (a task with ``show_data``).

    Raises:
        NibbleError: ``name`` is no task, or one that cannot show its data.
    """
    task = get_task(name) if name is not None else None
    if task is not None and hasattr(task, "show_data"):
        return task
    viewers = [t for t in map(get_task, TASKS) if hasattr(t, "show_data")]
    if task is None:
        return viewers[0]
    shown = ", ".join(t.name for t in viewers)
    raise NibbleError(f"nibble data show: task {name!r} cannot show its data; use --task {shown}")


def option_owners() -> dict[str, list[str]]:
    """Each task-owned TrainConfig field and the built-in tasks that read it."""
    owners: dict[str, list[str]] = {}
    for name in TASKS:
        for option in get_task(name).options:
            owners.setdefault(option, []).append(name)
    return owners


__all__ = [
    "TASKS",
    "SavedModel",
    "Task",
    "TaskRun",
    "data_viewer",
    "get_task",
    "option_owners",
    "task_for_head",
    "task_names",
]

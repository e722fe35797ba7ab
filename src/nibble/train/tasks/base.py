"""The Task protocol: everything that differs between training objectives, in one place per task.

A task module (``nibble.train.tasks.classify``, ``...instruct``, or a user's own) defines one class that
satisfies :class:`Task` and is named in the registry (:data:`nibble.train.tasks.TASKS`). The run
(:mod:`nibble.train.run`) knows nothing about any task but what these two types say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from nibble.data.batching import Dataset
from nibble.train.metrics import headline

if TYPE_CHECKING:
    from nibble.io.tokenizer import Tokenizer
    from nibble.model.config import ModelConfig
    from nibble.train.config import TrainConfig

Batch = dict[str, torch.Tensor]
# (loss, named metrics): the metrics are scalars on the device, averaged over a log window and logged beside the
# loss (names must not collide with the train record's own keys: step, loss, lr, grad_norm, ...).
LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]


def decoder_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's output on a collated batch, with its ``token_index`` (so the model's token layout reads nothing
    back from the device: see :func:`nibble.data.batching.pad_batch`)."""
    return model(batch["input_ids"], batch["attention_mask"], token_index=batch["token_index"])


@dataclass(kw_only=True)
class TaskRun:
    """What a task gives one training run, once its data is read and checked.

    ``forward(model, batch)`` (inside autocast; default: the model's output on ``input_ids`` and
    ``attention_mask``) feeds ``loss(outputs, batch)``, which returns the loss and named metrics;
    ``loss_units(batch)`` is what the loss averages over (default: the rows), which weighs micro-batches and
    ranks; ``evaluate(model, batch_size)`` returns metrics with ``"loss"`` (None: nothing to evaluate, no
    validation data); ``sample_groups`` (one group per training example) makes the batch stream repeat minority
    groups up to the largest; ``num_labels`` sizes a classification head; ``labels`` name the classes in plots;
    ``save(directory)`` writes the files every export carries beside the weights (a label map, a chat template);
    ``report`` formats the final evaluation; ``summary`` describes the data on the start line; ``prepare(model,
    eval_batch_size, dtype)`` runs once the model is loaded, before training starts or resumes (what the data needs
    from the model before any step, such as precomputed reference log-probs); ``rows_per_example`` is how many of
    ``--batch-size``'s rows one example makes (GRPO: a prompt makes G completions), so a micro-batch takes
    ``batch_size / rows_per_example`` examples. ``rollout(model, batch)`` (GRPO: sampling and scoring) runs once on
    each micro-batch the stream gives, on the device, without gradients, before any forward of its step; what it
    returns is the batch ``forward`` and ``loss`` see for ``iterations`` optimizer steps in a row (each batch drawn
    feeds that many steps: GRPO's num_iterations). ``loss`` may add tensors to it for the later steps (GRPO: the
    first pass's log-probs, as the sampling policy's), and a checkpoint taken between those steps saves it; with a
    rollout, ``loss_units`` reads the rolled-out batch (its host tensors). ``step_units`` weighs the micro-batches
    of a step by their ``loss_units`` too, so that the step's loss is the mean over all its units rather than the
    mean of the micro-batches' means (GRPO's ``dapo``: a token mean over the step, as TRL's).
    """

    train: Dataset
    val: Dataset | None
    loss: Callable[[Any, Batch], LossResult]
    summary: str
    evaluate: Callable[[nn.Module, int], dict[str, Any]] | None = None
    forward: Callable[[nn.Module, Batch], Any] | None = None
    loss_units: Callable[[Batch], float] | None = None
    sample_groups: Sequence[int] | None = None
    num_labels: int | None = None
    labels: list[Any] = field(default_factory=list)
    save: Callable[[Path], None] | None = None
    report: Callable[[dict[str, Any]], str] = headline
    prepare: Callable[[nn.Module, int, torch.dtype], None] | None = None
    rows_per_example: int = 1
    rollout: Callable[[nn.Module, Batch], Batch] | None = None
    iterations: int = 1
    step_units: bool = False


@dataclass(kw_only=True)
class SavedModel:
    """What ``nibble eval`` / ``predict`` asked for: a trained model (``model`` with ``adapter``), the data to score
    and the flags given (None: as in training); ``any_base`` applies the adapter to a base other than its own."""

    model: str
    adapter: str | None
    data: str
    batch_size: int
    device: str
    cache_budget_mb: int | None
    max_seq_len: int | None
    any_base: bool = False
    options: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A training objective.

    Attributes:
        name: the value of ``--task``.
        head: the model head it trains: ``"classify"`` (a ``score`` layer on a pooled token) or ``"causal_lm"``.
        options: the TrainConfig fields only this task reads (its config section); another task refuses them.
        sequences_per_row: (optional, default 1) the sequences one example of its data computes with gradients,
            for the memory planner (a preference pair: 2).

    Optional methods: ``held_out(config, tokenizer)`` gives the run's validation rows as LM targets and where they
    came from (a :class:`nibble.data.batching.Dataset` of ``collate_lm`` batches, or None), which ``nibble export``
    scores the GGUF file on; ``show_data(config, rows, colour)`` prints how training renders the data
    (``nibble data show``).
    """

    name: str
    head: str
    options: tuple[str, ...]

    def check(self, config: TrainConfig) -> None:
        """Raise NibbleError for a bad combination of this task's options (single values are checked already)."""

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        """Read and check the data of ``config`` (before the output directory is touched)."""

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        """The planner's term for the head and the loss: ``(bytes per token, fixed bytes)`` at the step's peak."""

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        """``nibble eval``: load the trained model, score ``request.data``, print the report, return the metrics."""

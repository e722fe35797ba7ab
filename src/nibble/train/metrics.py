"""Evaluation metrics, the metrics.jsonl log, and PNG plots of a run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nibble.io.files import write_error, write_text_atomic
from nibble.io.runinfo import LabelMap


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, multi_label: bool, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean loss of a batch, in fp32.

    Single-label: cross-entropy; with ``weights`` [K] it is ``sum_i w[y_i] * ce_i / sum_i w[y_i]``.
    Multi-label: binary cross-entropy with logits averaged over rows and labels; ``weights`` [K] is the
    positive-class weight of each label.
    """
    logits = logits.float()
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights)
    return torch.nn.functional.cross_entropy(logits, labels, weight=weights)


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, label_map: LabelMap, loss: float
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``probs`` is [N, K]; ``labels`` is [N] class ids, or [N, K] multi-hot for multi-label data (a label
    is predicted when its probability is >= 0.5; accuracy is then the exact-match rate and the confusion
    matrix holds per-label [[tn, fp], [fn, tp]]).
    """
    k = label_map.num_labels
    if label_map.multi_label:
        pred = probs >= 0.5
        truth = labels.bool()
        tp = (pred & truth).sum(0).double()
        fp = (pred & ~truth).sum(0).double()
        fn = (~pred & truth).sum(0).double()
        tn = (~pred & ~truth).sum(0)
        accuracy = float((pred == truth).all(1).double().mean())
        confusion = [[[int(tn[c]), int(fp[c])], [int(fn[c]), int(tp[c])]] for c in range(k)]
        support = truth.sum(0)
    else:
        pred = probs.argmax(1)
        matrix = torch.zeros(k, k, dtype=torch.long)
        matrix.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        tp = matrix.diag().double()
        fp = matrix.sum(0).double() - tp
        fn = matrix.sum(1).double() - tp
        accuracy = float((pred == labels).double().mean())
        confusion = matrix.tolist()
        support = matrix.sum(1)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    per_class = {
        str(label): {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c, label in enumerate(label_map.labels)
    }
    return {
        "loss": loss,
        "accuracy": accuracy,
        "macro_f1": float(f1.mean()),
        "examples": int(probs.shape[0]),
        "per_class": per_class,
        "confusion_matrix": confusion,
    }


_HEADLINE = (("loss", "loss"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("perplexity", "perplexity"))


def headline(metrics: dict[str, Any]) -> str:
    """The headline numbers a run has (loss, accuracy, macro-F1, perplexity) on one line."""
    return "  ".join(f"{name} {metrics[key]:.4f}" for key, name in _HEADLINE if key in metrics)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: headline numbers, then precision/recall per class."""
    lines = [f"{headline(metrics)}  ({metrics['examples']} rows)"]
    width = max(len(label) for label in metrics["per_class"])
    for label, m in metrics["per_class"].items():
        lines.append(
            f"  {label:<{width}}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"f1 {m['f1']:.3f}  support {m['support']}"
        )
    return "\n".join(lines)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation, appended and flushed at once, and
    handed to each of ``mirrors`` (objects with ``write(record)``: TensorBoard, W&B; see nibble.train.report)."""

    def __init__(self, path: Path, mirrors: list | None = None):
        self.path = path
        self.mirrors = mirrors or []

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run writes them again)."""
        if self.path.is_file():
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one line; a failed write (full disk) is cut off again, so the file never ends mid-line.

        Raises:
            NibbleError: the write failed, naming the directory.
        """
        line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        with open(self.path, "ab", buffering=0) as f:
            size = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line) :]
            except OSError as exc:
                f.truncate(size)
                raise write_error(self.path.parent, exc, len(line)) from None
        for mirror in self.mirrors:
            mirror.write(record)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
        return out


def plot_run(
    records: list[dict[str, Any]],
    final_eval: dict[str, Any] | None,
    labels: list,
    directory: Path,
    name: str | None = None,
) -> None:
    """Write the plots of a run into ``directory``, each titled with the run's ``name``: loss.png (train and val
    loss, with the learning rate and the gradient norm in panels below), and what the evaluations hold:
    accuracy.png (val accuracy), perplexity.png (val perplexity), rewards.png (a preference run's chosen and rejected
    rewards and their margin), reward.png and length.png (a GRPO run's rewards and completion lengths),
    confusion_matrix.png (single-label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}: " if name else ""
    figures = {"loss": training_figure(records, f"{prefix}training")}
    evals = [r for r in records if r.get("kind") == "eval"]
    for key, label in (("accuracy", "val accuracy"), ("perplexity", "val perplexity")):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set(xlabel="step", ylabel=label, title=f"{prefix}{label}")
        if key == "accuracy":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        figures[key] = fig
    train = [r for r in records if r.get("kind") == "train"]
    if any("rewards/margins" in r for r in train):  # a preference run: its implicit rewards over the steps
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            points = [(r["step"], r[key]) for r in train if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), label=key.split("/")[1])
        ax.set(xlabel="step", ylabel="reward", title=f"{prefix}train rewards")
        ax.legend()
        ax.grid(alpha=0.3)
        figures["rewards"] = fig
    if any("completion_len" in r for r in train):  # a GRPO run: its rewards and completion lengths over the steps
        for key, series, label in (
            ("reward", (("reward", "train"),), "mean total reward"),
            ("length", (("completion_len", "mean"), ("completion_len_max", "max")), "completion tokens"),
        ):
            fig, ax = plt.subplots(figsize=(6, 4))
            for field, name in series:
                ax.plot([r["step"] for r in train], [r[field] for r in train], label=name)
            if key == "reward" and any("reward" in r for r in evals):
                ax.plot(*zip(*[(r["step"], r["reward"]) for r in evals], strict=True), marker="o", label="val")
            ax.set(xlabel="step", ylabel=label, title=f"{prefix}{label}")
            ax.legend()
            ax.grid(alpha=0.3)
            figures[key] = fig
    matrix = (final_eval or {}).get("confusion_matrix")
    if matrix and not isinstance(matrix[0][0], list):
        at = f" at step {final_eval['step']}" if "step" in final_eval else ""
        figures["confusion_matrix"] = confusion_figure(matrix, labels, f"{prefix}confusion matrix{at}")
    for key, fig in figures.items():
        fig.tight_layout()
        fig.savefig(directory / f"{key}.png", dpi=100)
        plt.close(fig)


def training_figure(records: list[dict[str, Any]], title: str):
    """Three panels over the optimizer step: train and val loss; learning rate; gradient norm (before clipping)."""
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (loss, lr, norm) = plt.subplots(3, 1, figsize=(7, 7), sharex=True, height_ratios=(2, 1, 1))
    fig.suptitle(title)
    if train:
        loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], marker="o", label="val loss")
    loss.set_ylabel("loss")
    loss.legend()
    for ax, key, label in ((lr, "lr", "learning rate"), (norm, "grad_norm", "gradient norm")):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax.plot(*zip(*points, strict=True))
        ax.set_ylabel(label)
    norm.set_xlabel("step")
    for ax in (loss, lr, norm):
        ax.grid(alpha=0.3)
    return fig


def confusion_figure(matrix: list[list[int]], labels: list, title: str):
    """The confusion matrix (rows: true label, columns: predicted), each count written in black or white,
    whichever contrasts more with its cell's colour."""
    import matplotlib.pyplot as plt

    size = max(3.5, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(ticks, [str(x) for x in labels])
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            cell = image.cmap(image.norm(count))
            ax.text(j, i, str(count), ha="center", va="center", color=_text_colour(cell))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def _text_colour(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever contrasts more with ``rgba`` (WCAG 2 relative luminance: black text wins above
    0.179, where both contrast ratios are equal)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > 0.179 else "white"

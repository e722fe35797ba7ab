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


# Up to DENSE_LABELS labels a single-label evaluation keeps its whole K x K confusion matrix; above, memory
# and records stay linear in K: the matrix among the DENSE_LABELS labels with most rows (and a column for every
# other prediction), and the CONFUSED_PAIRS most frequent confusions.
DENSE_LABELS = 30
CONFUSED_PAIRS = 50
SHOWN_CLASSES = 30  # per-class lines printed at most


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, label_map: LabelMap, loss: float
) -> dict[str, Any]:
    """Loss, accuracy, macro-F1, per-class precision/recall/F1/support and the confusion counts.

    ``probs`` is [N, K]; ``labels`` is [N] class ids, or [N, K] multi-hot for multi-label data (a label
    is predicted when its probability is >= 0.5; accuracy is then the exact-match rate and the confusion
    matrix holds per-label [[tn, fp], [fn, tp]]). Single-label with at most ``DENSE_LABELS`` labels:
    ``confusion_matrix`` [K, K] (rows: true, columns: predicted); with more, ``confusion_top`` (``labels``: the
    ``DENSE_LABELS`` labels with most rows; ``matrix``: their rows' counts [n, n + 1], the last column every
    other prediction) and ``confused_pairs`` ([true, predicted, count], most frequent first). Time and memory
    are linear in N and K.
    """
    k = label_map.num_labels
    out: dict[str, Any] = {}
    if label_map.multi_label:
        pred = probs >= 0.5
        truth = labels.bool()
        tp = (pred & truth).sum(0).double()
        fp = (pred & ~truth).sum(0).double()
        fn = (~pred & truth).sum(0).double()
        tn = (~pred & ~truth).sum(0)
        accuracy = float((pred == truth).all(1).double().mean())
        out["confusion_matrix"] = [[[int(tn[c]), int(fp[c])], [int(fn[c]), int(tp[c])]] for c in range(k)]
        support = truth.sum(0)
    else:
        pred = probs.argmax(1)
        support = torch.bincount(labels, minlength=k)
        tp = torch.bincount(labels[pred == labels], minlength=k).double()
        fp = torch.bincount(pred, minlength=k).double() - tp
        fn = support.double() - tp
        accuracy = float((pred == labels).double().mean())
        out.update(_confusion(labels, pred, support, label_map))
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    rows = torch.stack([precision, recall, f1]).tolist()  # one conversion, not 3 K tensor reads
    per_class = {
        str(label): {"precision": rows[0][c], "recall": rows[1][c], "f1": rows[2][c], "support": n}
        for (c, label), n in zip(enumerate(label_map.labels), support.tolist(), strict=True)
    }
    return {
        "loss": loss,
        "accuracy": accuracy,
        "macro_f1": float(f1.mean()),
        "examples": int(probs.shape[0]),
        "per_class": per_class,
        **out,
    }


def _confusion(labels: torch.Tensor, pred: torch.Tensor, support: torch.Tensor, label_map: LabelMap) -> dict:
    """The single-label confusion counts of :func:`classification_metrics`, from the (true, predicted) pairs
    that occur (never a K x K table above ``DENSE_LABELS``)."""
    k = label_map.num_labels
    if k <= DENSE_LABELS:
        matrix = torch.zeros(k, k, dtype=torch.long)
        matrix.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
        return {"confusion_matrix": matrix.tolist()}
    names = label_map.labels
    top = torch.argsort(-support, stable=True)[:DENSE_LABELS]  # the labels with most rows, ties by id
    column = torch.full((k,), DENSE_LABELS, dtype=torch.long)  # predicted label -> its column (other: last)
    column[top] = torch.arange(len(top))
    position = torch.full((k,), -1, dtype=torch.long)
    position[top] = torch.arange(len(top))
    shown = position[labels] >= 0
    matrix = torch.zeros(len(top), DENSE_LABELS + 1, dtype=torch.long)
    matrix.index_put_(
        (position[labels[shown]], column[pred[shown]]), torch.ones(int(shown.sum()), dtype=torch.long), accumulate=True
    )
    wrong = pred != labels
    pairs, counts = torch.unique(labels[wrong] * k + pred[wrong], return_counts=True)
    order = torch.argsort(-counts, stable=True)[:CONFUSED_PAIRS]
    confused = [
        [names[int(p) // k], names[int(p) % k], int(c)] for p, c in zip(pairs[order], counts[order], strict=True)
    ]
    return {
        "confusion_top": {"labels": [names[int(i)] for i in top], "matrix": matrix.tolist()},
        "confused_pairs": confused,
    }


_HEADLINE = (("loss", "loss"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("perplexity", "perplexity"))


def headline(metrics: dict[str, Any]) -> str:
    """The headline numbers a run has (loss, accuracy, macro-F1, perplexity) on one line."""
    return "  ".join(f"{name} {metrics[key]:.4f}" for key, name in _HEADLINE if key in metrics)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: headline numbers, then precision/recall per class (the ``SHOWN_CLASSES``
    with most rows, when there are more, then a line saying how many are left out)."""
    lines = [f"{headline(metrics)}  ({metrics['examples']} rows)"]
    classes = list(metrics["per_class"].items())
    if len(classes) > SHOWN_CLASSES:
        classes = sorted(classes, key=lambda item: -item[1]["support"])[:SHOWN_CLASSES]
    width = max(len(label) for label, _ in classes)
    for label, m in classes:
        lines.append(
            f"  {label:<{width}}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"f1 {m['f1']:.3f}  support {m['support']}"
        )
    if len(classes) < len(metrics["per_class"]):
        left = len(metrics["per_class"]) - len(classes)
        lines.append(f"  ({left:,} classes with fewer rows not shown; every class is in the report's per_class)")
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
    final_eval = final_eval or {}
    at = f" at step {final_eval['step']}" if "step" in final_eval else ""
    matrix, top = final_eval.get("confusion_matrix"), final_eval.get("confusion_top")
    # (a multi-label run's per-label 2 x 2 counts are not drawn)
    if len(labels) <= DENSE_LABELS and _counts(matrix, len(labels), len(labels)):
        figures["confusion_matrix"] = confusion_figure(matrix, labels, labels, f"{prefix}confusion matrix{at}")
    elif isinstance(top, dict) and isinstance(top.get("labels"), list) and top["labels"]:
        shown = top["labels"]  # many labels: those with most rows, every other prediction in one column
        if len(shown) <= DENSE_LABELS and _counts(top.get("matrix"), len(shown), len(shown) + 1):
            title = f"{prefix}confusion matrix{at}, the {len(shown)} of {len(labels):,} labels with most rows"
            figures["confusion_matrix"] = confusion_figure(top["matrix"], shown, [*shown, "other"], title)
    for key, fig in figures.items():
        fig.tight_layout()
        fig.savefig(directory / f"{key}.png", dpi=100)
        plt.close(fig)


def _counts(matrix: Any, rows: int, columns: int) -> bool:
    """Whether ``matrix`` is ``rows`` lists of ``columns`` counts (what an evaluation wrote; a checkpoint's
    ``last_eval`` is read back from disk)."""
    return (
        isinstance(matrix, list)
        and len(matrix) == rows
        and all(isinstance(row, list) and len(row) == columns for row in matrix)
        and all(type(n) is int and n >= 0 for row in matrix for n in row)
    )


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


def confusion_figure(matrix: list[list[int]], rows: list, columns: list, title: str):
    """A confusion matrix (``rows``: true labels, ``columns``: predicted), each count written in black or white,
    whichever contrasts more with its cell's colour."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * len(columns) + 2.5), max(3.5, 0.6 * len(rows) + 2.5)))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), [str(x)[:24] for x in columns], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(x)[:24] for x in rows])
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

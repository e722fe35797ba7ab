"""Losses (with class weights) and evaluation metrics against hand-computed values; plots are written."""

import math

import pytest
import torch

from nibble.data import LabelMap
from nibble.train.metrics import (
    CONFUSED_PAIRS,
    DENSE_LABELS,
    SHOWN_CLASSES,
    MetricsLog,
    classification_loss,
    classification_metrics,
    format_metrics,
    plot_run,
)


def test_weighted_cross_entropy_is_the_weighted_mean():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.1, 0.3], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    weights = torch.tensor([0.5, 2.0, 1.5])
    nll = -logits.log_softmax(-1)[torch.arange(4), labels]
    w = weights[labels]
    expected = (w * nll).sum() / w.sum()
    torch.testing.assert_close(classification_loss(logits, labels, False, weights), expected)
    torch.testing.assert_close(classification_loss(logits, labels, False), nll.mean())
    assert not torch.isclose(classification_loss(logits, labels, False, weights), nll.mean())


def test_multi_label_bce_with_positive_weights():
    logits = torch.tensor([[1.0, -2.0, 0.5], [-0.3, 0.8, 2.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    pos = torch.tensor([3.0, 1.0, 0.5])
    p = logits.sigmoid()
    expected = -(pos * labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(classification_loss(logits, labels, True, pos), expected)


def test_single_label_metrics():
    lm = LabelMap(["a", "b", "c"])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    probs = torch.nn.functional.one_hot(pred, 3).float()
    m = classification_metrics(probs, labels, lm, loss=0.5)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = m["per_class"]["a"], m["per_class"]["b"], m["per_class"]["c"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"]) == (0.5, 1.0)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_multi_label_metrics():
    lm = LabelMap(["x", "y"], multi_label=True)
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.4], [0.1, 0.7]])
    m = classification_metrics(probs, labels, lm, loss=0.1)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[[1, 0], [0, 2]], [[1, 0], [1, 1]]]
    assert m["per_class"]["y"]["recall"] == 0.5 and m["per_class"]["x"]["f1"] == 1.0


def test_log_truncation_and_plots(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"kind": "train", "step": step, "loss": 1 / step})
    log.write({"kind": "eval", "step": 5, "loss": 0.3, "accuracy": 0.7})
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a kill
    log.truncate_after(3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.write({"kind": "eval", "step": 3, "loss": 0.4, "accuracy": 0.6})
    final = classification_metrics(torch.eye(2), torch.tensor([0, 1]), LabelMap(["n", "p"]), math.nan)
    plot_run(log.records(), final, ["n", "p"], tmp_path / "plots")
    for name in ("loss.png", "accuracy.png", "confusion_matrix.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def dense_reference(labels, pred, k):
    """The whole K x K matrix and per-class numbers the plain way (the oracle above DENSE_LABELS)."""
    import numpy as np

    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (labels.numpy(), pred.numpy()), 1)
    tp = np.diag(matrix).astype(float)
    precision = np.divide(tp, matrix.sum(0), out=np.zeros(k), where=matrix.sum(0) > 0)
    recall = np.divide(tp, matrix.sum(1), out=np.zeros(k), where=matrix.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    return matrix, precision, recall, f1


@pytest.mark.parametrize("k", [DENSE_LABELS, DENSE_LABELS + 1, 400])
def test_many_labels_keep_the_busiest_classes_and_the_top_confusions(k):
    """Above DENSE_LABELS the metrics hold no K x K matrix: the sub-matrix of the labels with most rows (and an
    'other' column), the most frequent confusions; every per-class number equals the dense reference's."""
    gen = torch.Generator().manual_seed(k)
    labels = torch.randint(0, k, (3000,), generator=gen) % torch.randint(1, k + 1, (3000,), generator=gen)
    pred = torch.where(torch.rand(3000, generator=gen) < 0.6, labels, torch.randint(0, k, (3000,), generator=gen))
    pred[:200] = (labels[:200] + 1) % k  # some frequent confusions
    names = [f"class-{i}" for i in range(k)]
    m = classification_metrics(torch.nn.functional.one_hot(pred, k).float(), labels, LabelMap(names), 0.0)
    matrix, precision, recall, f1 = dense_reference(labels, pred, k)
    for c, name in enumerate(names):
        got = m["per_class"][name]
        assert got["support"] == matrix[c].sum()
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[c], recall[c], f1[c]))
    assert m["macro_f1"] == pytest.approx(f1.mean())
    if k <= DENSE_LABELS:
        assert m["confusion_matrix"] == matrix.tolist() and "confusion_top" not in m
        return
    assert "confusion_matrix" not in m
    top = sorted(range(k), key=lambda c: (-matrix[c].sum(), c))[:DENSE_LABELS]
    assert m["confusion_top"]["labels"] == [names[c] for c in top]
    sub = matrix[top][:, top]
    other = matrix[top].sum(1) - sub.sum(1)
    assert m["confusion_top"]["matrix"] == [[*row, int(o)] for row, o in zip(sub.tolist(), other, strict=True)]
    off = sorted((-matrix[t, p], t, p) for t in range(k) for p in range(k) if t != p and matrix[t, p])
    assert m["confused_pairs"] == [[names[t], names[p], -n] for n, t, p in off[:CONFUSED_PAIRS]]


def test_format_metrics_shows_the_busiest_classes_and_says_how_many_are_left_out():
    k = SHOWN_CLASSES + 7
    labels = torch.arange(k).repeat_interleave(torch.arange(1, k + 1))  # class c has c + 1 rows
    m = classification_metrics(torch.nn.functional.one_hot(labels, k).float(), labels, LabelMap(list(range(k))), 0.0)
    lines = format_metrics(m).splitlines()
    assert len(lines) == SHOWN_CLASSES + 2 and lines[1].split()[0] == str(k - 1)
    assert "7 classes with fewer rows not shown" in lines[-1]
    assert len(format_metrics({**m, "per_class": dict(list(m["per_class"].items())[:3])}).splitlines()) == 4


METRICS_UNDER_LIMIT = """
import resource, torch
from nibble.data import LabelMap
from nibble.train.metrics import classification_metrics

k, n = 10_000, 2_000
probs = torch.rand(n, k)
labels = torch.randint(0, k, (n,))
label_map = LabelMap([f"label {i}" for i in range(k)])
held = int([line for line in open("/proc/self/status") if line.startswith("VmData")][0].split()[1]) * 1024
limit = held + 64 * 2**20  # K x K counts alone would take 800 MB
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
m = classification_metrics(probs, labels, label_map, 0.0)
print("DONE", len(m["per_class"]), len(m["confusion_top"]["labels"]))
"""


def test_metrics_of_ten_thousand_labels_fit_a_memory_limit_linear_in_the_labels():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", METRICS_UNDER_LIMIT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"DONE 10000 {DENSE_LABELS}" in result.stdout, result.stderr[-2000:]

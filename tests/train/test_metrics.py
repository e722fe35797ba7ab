"""Losses (with class weights) and evaluation metrics against hand-computed values; plots are written."""

import math

import pytest
import torch

from nibble.data import LabelMap
from nibble.train.metrics import MetricsLog, classification_loss, classification_metrics, plot_run


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

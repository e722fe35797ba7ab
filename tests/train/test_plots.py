"""The plots of a run: titled with its name; loss with learning-rate and gradient-norm panels; a confusion matrix
whose counts stay legible on every cell colour (WCAG contrast of the text against the cell)."""

from __future__ import annotations

import matplotlib
import pytest

from nibble.train.metrics import confusion_figure, plot_run, training_figure

matplotlib.use("Agg")


def contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two colours."""

    def luminance(rgb):
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_confusion_counts_contrast_with_their_cells():
    from matplotlib.colors import to_rgb

    matrix = [[120, 3, 0, 9], [14, 60, 31, 2], [0, 45, 77, 1], [5, 0, 18, 99]]  # light to dark cells
    fig = confusion_figure(matrix, ["a", "b", "c", "d"], ["a", "b", "c", "d"], "intent: confusion matrix")
    ax = fig.axes[0]
    image = ax.images[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == 16 and ax.get_title() == "intent: confusion matrix"
    colours = set()
    for (i, j), text in texts.items():
        assert text.get_text() == str(matrix[i][j])
        cell = image.cmap(image.norm(matrix[i][j]))
        colours.add(text.get_color())
        assert contrast(to_rgb(text.get_color()), cell) >= 4.5, (matrix[i][j], text.get_color())
    assert colours == {"black", "white"}


def test_training_figure_has_loss_lr_and_grad_norm_panels():
    records = [{"kind": "train", "step": s, "loss": 2 / s, "lr": 1e-3 * s, "grad_norm": 0.5 + s} for s in (1, 2, 3)]
    records.append({"kind": "eval", "step": 3, "loss": 0.9})
    fig = training_figure(records, "intent: training")
    assert fig._suptitle.get_text() == "intent: training"
    loss, lr, norm = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "learning rate", "gradient norm"]
    assert [list(line.get_ydata()) for line in loss.lines] == [[2, 1, pytest.approx(2 / 3)], [0.9]]
    assert list(lr.lines[0].get_ydata()) == [1e-3, 2e-3, 3e-3]
    assert list(norm.lines[0].get_xdata()) == [1, 2, 3] and list(norm.lines[0].get_ydata()) == [1.5, 2.5, 3.5]


def test_plot_run_writes_titled_pngs(tmp_path):
    records = [{"kind": "train", "step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0}]
    records.append({"kind": "eval", "step": 1, "loss": 0.5, "accuracy": 0.5})
    final = {"step": 1, "confusion_matrix": [[1, 1], [0, 2]]}
    plot_run(records, final, ["n", "p"], tmp_path, name="intent")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "confusion_matrix.png", "loss.png"]


@pytest.mark.parametrize(
    "final",
    [
        {"confusion_matrix": [["x", 1], [0, 2]]},
        {"confusion_matrix": [[1, 1, 1], [0, 2]]},
        {"confusion_matrix": [[1]]},
        {"confusion_top": 5},
        {"confusion_top": {"labels": ["n"], "matrix": [[1]]}},
        {"confusion_top": {"labels": ["n"] * 10**4, "matrix": [[0] * (10**4 + 1)] * 10**4}},
    ],
)
def test_confusion_counts_that_an_evaluation_did_not_write_are_not_drawn(tmp_path, final):
    """A checkpoint's last_eval is read back from disk: counts of the wrong shape or kind (or more classes than
    an evaluation keeps) draw no confusion plot, and the other plots are written."""
    plot_run([{"kind": "train", "step": 1, "loss": 1.0}], {"step": 1, **final}, ["n", "p"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]

"""`sftjob plot`'s figure: the curves are the history's points, the axes are labelled, and
the PNG it writes is an image of them (matplotlib and Pillow: the `cli` extra)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat
from sftjob_operator.loss_plot import (
    DPI,
    FIGURE_INCHES,
    INSTALL_HINT,
    MissingPlotting,
    figure_title,
    has_curves,
    loss_figure,
    write_png,
)

# What status.progress.history holds (progress_report.history_point): eval loss on some
# points only, a point without a loss (an eval-only report).
HISTORY: list[dict[str, Any]] = [
    {"step": 1, "loss": 4.671, "learningRate": 0.0001, "gradNorm": 3.2, "tokensPerSecond": 812},
    {"step": 2, "loss": 4.102, "learningRate": 0.0002, "gradNorm": 2.9},
    {"step": 4, "loss": 3.557, "learningRate": 0.00018, "evalLoss": 3.9},
    {"step": 6, "learningRate": 0.00012, "evalLoss": 3.61},
    {"step": 8, "loss": 2.914, "learningRate": 0.00005, "evalLoss": 3.402},
]


def line_data(axes: Any, label: str) -> tuple[list[float], list[float]]:
    (line,) = [line for line in axes.get_lines() if line.get_label() == label]
    return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


def test_the_curves_are_the_history_points() -> None:
    figure = loss_figure(HISTORY, "SFTJob demo (Succeeded, step 8/8)")
    loss_axes, lr_axes = figure.axes

    assert line_data(loss_axes, "train loss") == ([1, 2, 4, 8], [4.671, 4.102, 3.557, 2.914])
    assert line_data(loss_axes, "eval loss") == ([4, 6, 8], [3.9, 3.61, 3.402])
    assert line_data(lr_axes, "learning rate") == (
        [1, 2, 4, 6, 8],
        [0.0001, 0.0002, 0.00018, 0.00012, 0.00005],
    )


def test_the_axes_are_labelled_and_share_the_step_axis() -> None:
    figure = loss_figure(HISTORY, "SFTJob demo (Succeeded, step 8/8)")
    loss_axes, lr_axes = figure.axes
    assert loss_axes.get_ylabel() == "loss"
    assert lr_axes.get_ylabel() == "learning rate"
    assert lr_axes.get_xlabel() == "step"
    assert loss_axes.get_shared_x_axes().joined(loss_axes, lr_axes)
    assert figure.get_suptitle() == "SFTJob demo (Succeeded, step 8/8)"
    legend = loss_axes.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["train loss", "eval loss"]


def test_no_eval_loss_draws_no_eval_curve() -> None:
    figure = loss_figure([{k: v for k, v in p.items() if k != "evalLoss"} for p in HISTORY], "t")
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["train loss"]


@pytest.mark.parametrize("history", [[], [{"step": 0}]], ids=["none", "only-a-step"])
def test_a_history_without_values_is_refused(history: list[dict[str, Any]]) -> None:
    assert not has_curves(history)
    with pytest.raises(ValueError, match="no history points"):
        loss_figure(history, "t")
    assert has_curves([{"step": 0}, {"step": 1, "learningRate": 1e-4}])


def test_without_matplotlib_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingPlotting) as raised:
        loss_figure(HISTORY, "t")
    assert (
        str(raised.value)
        == INSTALL_HINT
        == ("sftjob plot needs matplotlib: pip install 'sftjob[cli]'")
    )


def test_the_title_names_the_job_its_phase_and_step() -> None:
    assert figure_title("demo", "Running", {"step": 3, "totalSteps": 12}) == (
        "SFTJob demo (Running, step 3/12)"
    )
    assert figure_title("demo", "Pending") == "SFTJob demo (Pending)"


def test_the_png_is_an_image_of_the_curves(tmp_path: Path) -> None:
    path = tmp_path / "loss.png"
    figure = loss_figure(HISTORY, "SFTJob demo (Succeeded, step 8/8)")
    write_png(figure, path)

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (int(FIGURE_INCHES[0] * DPI), int(FIGURE_INCHES[1] * DPI))
        gray = image.convert("L")
        # Non-blank: a white page has variance 0; curves, ticks and text raise it.
        assert ImageStat.Stat(gray).var[0] > 100
        # The curves' colours are in it (tab:blue loss, tab:orange eval, tab:green lr).
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    for colour in [(31, 119, 180), (255, 127, 14), (44, 160, 44)]:
        assert colour in colours, colour

"""Pure figure of a run's curves, from `status.progress.history`, for `sftjob plot`.

Two panels sharing the step axis: the training loss with the eval loss where the run has
one, and the learning rate below (its scale is unrelated to the loss's). The figure is a
`matplotlib.figure.Figure` built without pyplot, so nothing global is touched and no
display is needed; saving it as PNG uses the Agg renderer.

matplotlib is the `cli` extra (`pip install 'sftjob[cli]'`); it is imported when a figure
is built, so the rest of the CLI works without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "sftjob plot needs matplotlib: pip install 'sftjob[cli]'"
# 8 x 6 inches at 100 dpi: an 800 x 600 PNG, readable in a README.
FIGURE_INCHES = (8.0, 6.0)
DPI = 100


class MissingPlotting(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the points of `history` that have `key`."""
    points = [(int(p["step"]), float(p[key])) for p in history if p.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def has_curves(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any point has a value to draw (the first report may carry only its step)."""
    keys = ("loss", "evalLoss", "learningRate")
    return any(point.get(key) is not None for point in history for key in keys)


def figure_title(name: str, phase: str, progress: Mapping[str, Any] | None = None) -> str:
    progress = progress or {}
    step, total = progress.get("step"), progress.get("totalSteps")
    where = f", step {step}/{total}" if step is not None and total else ""
    return f"SFTJob {name} ({phase}{where})"


def loss_figure(history: Sequence[Mapping[str, Any]], title: str) -> Figure:
    """Loss and eval loss over steps (top), learning rate over steps (bottom).

    Raises ValueError for a history without any point, MissingPlotting without matplotlib.
    """
    if not has_curves(history):
        raise ValueError("no history points to plot")
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingPlotting(INSTALL_HINT) from exc

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    figure.suptitle(title)

    steps, losses = series(history, "loss")
    loss_axes.plot(steps, losses, marker=".", label="train loss", color="tab:blue")
    eval_steps, eval_losses = series(history, "evalLoss")
    if eval_steps:
        loss_axes.plot(eval_steps, eval_losses, marker="o", label="eval loss", color="tab:orange")
    loss_axes.set_ylabel("loss")
    loss_axes.grid(True, alpha=0.3)
    loss_axes.legend(loc="upper right")

    lr_steps, rates = series(history, "learningRate")
    lr_axes.plot(lr_steps, rates, label="learning rate", color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(True, alpha=0.3)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return figure


def write_png(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=DPI)

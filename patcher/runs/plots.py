"""PNG plots of results a person would rather see than read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


@dataclass(frozen=True, kw_only=True)
class CurveRoles:
    """How the alpha plot draws each task: the patch tasks, the monitored ones (dashed, without a band), and every
    other (supported) task with a band at its zero-shot accuracy less its tolerance (one for all, or each task's)."""

    patch: Sequence[str]
    monitored: Sequence[str] = ()
    zeroshot: Mapping[str, float] | None = None
    tolerance: float | Mapping[str, float] | None = None


def alpha_curve_plot(curve: Mapping[float, Mapping[str, float]], chosen: float, path: Path, roles: CurveRoles,
                     title: str = "") -> None:
    """Held-out accuracy of each task against alpha, the chosen alpha marked, tolerance bands for supported tasks;
    monitored tasks dashed, without a band."""
    patch_tasks, monitored, zeroshot, tolerance = roles.patch, roles.monitored, roles.zeroshot, roles.tolerance
    alphas = sorted(curve)
    tasks = list(next(iter(curve.values())))
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for task in tasks:
        role = "patch" if task in patch_tasks else "monitored" if task in monitored else "supported"
        line = axes.plot(alphas, [curve[a][task] for a in alphas], marker="o", label=f"{task} ({role})",
                         linestyle="--" if role == "monitored" else "-")[0]
        allowed = tolerance.get(task) if isinstance(tolerance, Mapping) else tolerance
        if zeroshot is not None and allowed is not None and role == "supported":
            axes.axhline(zeroshot[task] - allowed, color=line.get_color(), linestyle=":", linewidth=1)
    axes.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"chosen alpha = {chosen:g}")
    axes.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_xlim(-0.02, 1.02)
    _finish(figure, axes, path, title or "accuracy against alpha", legend_size=8)


def wiseft_plot(
    curve: Mapping[float, Mapping[str, float]],
    chosen: float,
    path: Path,
    patch_tasks: Sequence[str],
    roles: Mapping[str, str],
    title: str = "",
) -> None:
    """WiSE-FT's picture: held-out accuracy on the patch task(s) (x, their mean) against each supported or monitored
    task's (y) over the alphas tried, zero-shot (alpha 0), fine-tuned (alpha 1) and the chosen alpha marked."""
    alphas = sorted(curve)
    others = [task for task in next(iter(curve.values())) if task not in patch_tasks]
    x = [sum(curve[a][t] for t in patch_tasks) / len(patch_tasks) for a in alphas]
    figure, axes = plt.subplots(figsize=(6.5, 5), dpi=120)
    for task in others:
        y = [curve[a][task] for a in alphas]
        line = axes.plot(x, y, marker=".", label=f"{task} ({roles.get(task, 'supported')})",
                         linestyle="--" if roles.get(task) == "monitor" else "-")[0]
        colour = line.get_color()
        for alpha, marker, size in ((0.0, "s", 60), (1.0, "^", 70), (chosen, "o", 90)):
            if alpha in curve:
                index = alphas.index(alpha)
                axes.scatter([x[index]], [y[index]], marker=marker, s=size, facecolors="none" if alpha == chosen and
                             alpha not in (0.0, 1.0) else colour, edgecolors=colour, zorder=3)
        for index in (0, len(alphas) - 1):
            axes.annotate(f"{alphas[index]:g}", (x[index], y[index]), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color=colour)
    for marker, text in (("s", "zero-shot (alpha 0)"), ("^", "fine-tuned (alpha 1)"), ("o", f"chosen ({chosen:g})")):
        axes.scatter([], [], marker=marker, color="grey", label=text)
    patch = patch_tasks[0] if len(patch_tasks) == 1 else f"mean of {', '.join(patch_tasks)}"
    axes.set_xlabel(f"{patch}: held-out accuracy (%)")
    axes.set_ylabel("other task: held-out accuracy (%)")
    _finish(figure, axes, path, title or "patch task against the others over alpha", legend_size=7)


def _finish(figure: Figure, axes: Axes, path: Path, title: str, legend_size: int) -> None:
    """Grid, legend and title, then the PNG written and the figure closed."""
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=legend_size)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

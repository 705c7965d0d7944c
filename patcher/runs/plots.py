"""PNG plots of results a person would rather see than read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def alpha_curve_plot(
    curve: Mapping[float, Mapping[str, float]],
    chosen: float,
    path: Path,
    patch_tasks: Sequence[str],
    zeroshot: Mapping[str, float] | None = None,
    tolerance: float | None = None,
    title: str = "",
) -> None:
    """Held-out accuracy of each task against alpha, the chosen alpha marked, tolerance bands for supported tasks."""
    alphas = sorted(curve)
    tasks = list(next(iter(curve.values())))
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for task in tasks:
        role = "patch" if task in patch_tasks else "supported"
        line = axes.plot(alphas, [curve[a][task] for a in alphas], marker="o", label=f"{task} ({role})")[0]
        if zeroshot is not None and tolerance is not None and task not in patch_tasks:
            axes.axhline(zeroshot[task] - tolerance, color=line.get_color(), linestyle=":", linewidth=1)
    axes.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"chosen alpha = {chosen:g}")
    axes.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_xlim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    axes.set_title(title or "accuracy against alpha")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

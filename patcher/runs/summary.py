"""Summaries of a run for people: the zero-shot / fine-tuned / patched table and the alpha choice."""

from __future__ import annotations

from rich.table import Table

from patcher.runs.layout import KINDS
from patcher.runs.manifest import Manifest


def accuracy_table(manifest: Manifest) -> Table:
    """Test accuracy per task for the zero-shot, fine-tuned and patched models."""
    table = Table(title=f"{manifest.name}: test accuracy (%), patched at alpha = {manifest.alpha.chosen:g}")
    table.add_column("task")
    table.add_column("role")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    table.add_column("patched - zero-shot", justify="right")
    for task, row in _rows(manifest):
        table.add_row(task, manifest.tasks[task].role, *(f"{v:.2f}" for v in row), f"{row[2] - row[0]:+.2f}")
    return table


def metrics_table(manifest: Manifest) -> Table | None:
    """Macro-F1 and worst-class test accuracy per task and model; None for a run built before they were recorded."""
    if not manifest.test_macro_f1:
        return None
    table = Table(title=f"{manifest.name}: test macro-F1 / worst-class accuracy (%)")
    table.add_column("task")
    table.add_column("role")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    for task, record in manifest.tasks.items():
        cells = [f"{manifest.test_macro_f1[kind][task]:.2f} / {manifest.test_worst_class_accuracy[kind][task]:.2f}"
                 for kind in KINDS]
        table.add_row(task, record.role, *cells)
    return table


def alpha_lines(manifest: Manifest) -> list[str]:
    """How alpha was chosen, in a few lines."""
    alpha = manifest.alpha
    lines = [
        f"alpha {alpha.chosen:g} ({alpha.mode}, {alpha.search} search, {alpha.evaluations} evaluations)",
        f"rule: {alpha.rule}",
    ]
    if alpha.warning:
        lines.append(f"warning: {alpha.warning}")
    return lines


def markdown_table(manifest: Manifest) -> str:
    """The accuracy table as Markdown, for the README and bench/results."""
    lines = [
        "| task | role | zero-shot | fine-tuned | patched | patched - zero-shot |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, row in _rows(manifest):
        cells = " | ".join(f"{v:.2f}" for v in row)
        lines.append(f"| {task} | {manifest.tasks[task].role} | {cells} | {row[2] - row[0]:+.2f} |")
    return "\n".join(lines)


def _rows(manifest: Manifest) -> list[tuple[str, list[float]]]:
    return [(task, [manifest.test_accuracy[kind][task] for kind in KINDS]) for task in manifest.tasks]

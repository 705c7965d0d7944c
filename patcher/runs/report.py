"""Summaries of a run for people: the zero-shot / fine-tuned / patched table and the alpha choice."""

from __future__ import annotations

from typing import Any

from rich.table import Table

KINDS = ("zeroshot", "finetuned", "patched")


def accuracy_table(manifest: dict[str, Any]) -> Table:
    """Test accuracy per task for the zero-shot, fine-tuned and patched models."""
    alpha = manifest["alpha"]["chosen"]
    table = Table(title=f"{manifest['name']}: test accuracy (%), patched at alpha = {alpha:g}")
    table.add_column("task")
    table.add_column("role")
    for kind in KINDS:
        table.add_column(kind, justify="right")
    table.add_column("patched - zero-shot", justify="right")
    accuracy = manifest["test_accuracy"]
    for task, entry in manifest["tasks"].items():
        row = [accuracy[kind][task] for kind in KINDS]
        table.add_row(task, entry["role"], *(f"{v:.2f}" for v in row), f"{row[2] - row[0]:+.2f}")
    return table


def alpha_lines(manifest: dict[str, Any]) -> list[str]:
    """How alpha was chosen, in a few lines."""
    alpha = manifest["alpha"]
    lines = [
        f"alpha {alpha['chosen']:g} ({alpha['mode']}, {alpha['search']} search, {alpha['evaluations']} evaluations)",
        f"rule: {alpha['rule']}",
    ]
    if alpha.get("warning"):
        lines.append(f"warning: {alpha['warning']}")
    return lines


def markdown_table(manifest: dict[str, Any]) -> str:
    """The accuracy table as Markdown, for the README and bench/results."""
    lines = [
        "| task | role | zero-shot | fine-tuned | patched | patched - zero-shot |",
        "|---|---|---:|---:|---:|---:|",
    ]
    accuracy = manifest["test_accuracy"]
    for task, entry in manifest["tasks"].items():
        row = [accuracy[kind][task] for kind in KINDS]
        cells = " | ".join(f"{v:.2f}" for v in row)
        lines.append(f"| {task} | {entry['role']} | {cells} | {row[2] - row[0]:+.2f} |")
    return "\n".join(lines)

"""The typer application every command registers on, the options several commands share, and the entry point."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from patcher.errors import PatcherError

app = typer.Typer(
    help="Patch one task of a CLIP model without breaking the others, export it to ONNX, serve it with Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Download = Annotated[bool, typer.Option(help="Download missing datasets (needs network).")]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="PATCHER_DATA", help="Dataset root (default ~/.cache/patcher/data).")
]

F = TypeVar("F", bound=Callable[..., Any])


def command(function: F) -> F:
    """Register a command whose PatcherErrors become one `error:` line on stderr and exit code 2."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PatcherError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    app.command()(wrapper)
    return function


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    """Entry point of the `patcher` command (and `python -m patcher`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import patcher.cli.patching
    import patcher.cli.serving  # noqa: F401

    try:
        app()
    except PatcherError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)

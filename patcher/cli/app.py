"""The typer application every command registers on, the options several commands share, and the entry point."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from patcher.base.errors import PatcherError, as_os_error, from_os_error

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


def expected_error(error: BaseException) -> PatcherError | None:
    """The PatcherError to report for an expected failure: a PatcherError, or an OSError (also one a library
    writer wraps, like safetensors' IoError) that no stage translated; None for anything else (a bug)."""
    if isinstance(error, PatcherError):
        return error
    os_error = as_os_error(error)
    return from_os_error(os_error) if os_error is not None else None


def report(error: PatcherError) -> None:
    """Print a PatcherError as the one `error:` line on stderr (newlines folded)."""
    typer.echo(f"error: {' '.join(str(error).split())}", err=True)


def command(function: F) -> F:
    """Register a command whose expected failures (`expected_error`) become one `error:` line and exit code 2."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            expected = expected_error(error)
            if expected is None:
                raise
            report(expected)
            raise typer.Exit(expected.exit_code) from None

    app.command()(wrapper)
    return function


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [item.strip() for item in text.split(",") if item.strip()]


def main() -> None:
    """Entry point of the `patcher` command (and `python -m patcher`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write fails with EFBIG (reported) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import patcher.cli.fleet
    import patcher.cli.make
    import patcher.cli.ship  # noqa: F401

    try:
        app()
    except Exception as error:
        expected = expected_error(error)
        if expected is None:
            raise
        report(expected)
        sys.exit(expected.exit_code)

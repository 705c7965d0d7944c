"""What the commands share: their common options, the one error path, the bare typer application."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from patcher.base.errors import PatcherError, as_os_error, from_os_error

Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Download = Annotated[bool, typer.Option(help="Download missing datasets (needs network).")]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="PATCHER_DATA", help="Dataset root (default ~/.cache/patcher/data).")
]

F = TypeVar("F", bound=Callable[..., Any])


def grpc_address(text: str | None) -> str | None:
    """--url as HOST:PORT (a scheme such as http:// dropped); PatcherError for anything else."""
    from patcher.triton.client import host_port

    return None if text is None else host_port(text)


Url = Annotated[str, typer.Option(callback=grpc_address,
                                  help="Triton's gRPC address, HOST:PORT (a scheme such as http:// is ignored).")]


def served_model(model: str | None, name: str | None) -> str | None:
    """The served entry from --model, or from --name (its old spelling, hidden); refused when both differ."""
    if model is not None and name is not None and model != name:
        raise PatcherError(f"--model {model!r} and --name {name!r} name two entries: pass --model only")
    return model if model is not None else name


HiddenName = Annotated[str | None, typer.Option("--name", hidden=True, help="Old spelling of --model.")]


def _version(value: bool) -> None:
    if value:
        from patcher import __version__

        typer.echo(f"patcher {__version__}")
        raise typer.Exit()


def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print patcher's version and exit.")] = False) -> None:
    """Patch one task of a CLIP model without breaking the others, export it to ONNX, serve it with Triton."""


def new_app() -> typer.Typer:
    """The typer application with no commands yet: `patcher --version`, help settings (cli/commands.py adds them)."""
    app = typer.Typer(
        help=_root.__doc__,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,  # click's plain help: wraps descriptions and never cuts an option name, at any width
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    )
    app.callback()(_root)
    return app


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


def one_error_line(function: F) -> F:
    """A command whose expected failures (`expected_error`) become one `error:` line and exit code 2."""

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

    return wrapper  # type: ignore[return-value]


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option."""
    return [item.strip() for item in text.split(",") if item.strip()]

"""The `patcher` command line: parse, call one stage function, print. No logic a test would want to call.

`app` has every command (cli/commands.py lists them); `main` is the entry point."""

from patcher.cli.app import main
from patcher.cli.commands import patcher_app

app = patcher_app()

__all__ = ["app", "main"]

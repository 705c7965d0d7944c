"""The `patcher` command line: parse, call one stage function, print. No logic a test would want to call."""

from patcher.cli import fleet, make, ship  # noqa: F401  (registers the commands on `app`)
from patcher.cli.app import app, main

__all__ = ["app", "main"]

"""The `patcher` command line: parse, call one stage function, print. No logic a test would want to call."""

from patcher.cli import make, ship  # noqa: F401  (registers the commands on `app`, in `patcher --help`'s order)
from patcher.cli.app import app, main
from patcher.cli.fleet import deploy as _deploy  # noqa: F401  (then deploy and verify)

__all__ = ["app", "main"]

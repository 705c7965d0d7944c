"""The entry point of the `patcher` command (and `python -m patcher`): the application with every command, run with
the one error path."""

from __future__ import annotations

import os
import signal
import sys

from patcher.cli.commands import patcher_app
from patcher.cli.shared import expected_error, report


def main() -> None:
    """Entry point of the `patcher` command (and `python -m patcher`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write fails with EFBIG (reported) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        patcher_app()()
    except Exception as error:
        expected = expected_error(error)
        if expected is None:
            raise
        report(expected)
        sys.exit(expected.exit_code)

"""Every `patcher` command, registered in one place, in `patcher --help`'s order."""

from __future__ import annotations

import typer

import patcher.cli.fleet as fleet
import patcher.cli.make as make
import patcher.cli.ship as ship
from patcher.cli.shared import new_app, one_error_line

COMMANDS = (
    make.build, make.merge, make.merge_methods, make.pretrain, make.show, make.demo, make.tasks, make.models,
    ship.export, ship.triton, ship.serve, ship.classify, ship.embed, ship.bench,
    fleet.deploy, fleet.verify,
)


def patcher_app() -> typer.Typer:
    """The `patcher` application with every command, each failing with one `error:` line."""
    app = new_app()
    for function in COMMANDS:
        app.command()(one_error_line(function))
    return app

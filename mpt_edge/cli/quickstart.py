"""`mpt-edge quickstart`: target adaptation from a shipped source vs zero-shot and vanilla PT, export, runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpt_edge.atomic import check_writable
from mpt_edge.cli.common import cli_errors
from mpt_edge.cli.options import DEFAULT_BACKBONE, Backbone

quickstart_app = typer.Typer()


@quickstart_app.command("quickstart")
@cli_errors
def quickstart_command(
    out: Annotated[Path, typer.Option(help="Working folder for checkpoints and results.")] = Path("runs/quickstart"),
    backbone: Backbone = DEFAULT_BACKBONE,
    steps: Annotated[int, typer.Option(help="Steps per stage and task (chosen on dev for the shipped source).")] = 20,
    test_limit: Annotated[int, typer.Option(help="Test examples per task.")] = 300,
    fresh: Annotated[bool, typer.Option(help="Delete earlier quickstart results first.")] = False,
):
    """Target adaptation from the backbone's shipped source prompt on a held-out task (tweet_sentiment),
    compared with zero-shot and vanilla PT, then export and the runtime; without a shipped source, teachers and
    a source are trained first (~10 minutes on 2 CPU cores). Results land in OUT/results.json.

    Example: mpt-edge quickstart
    """
    check_writable(out, keep=False)
    from mpt_edge.quickstart import QuickstartConfig, run_quickstart

    results = run_quickstart(QuickstartConfig(out=out, backbone=backbone, steps=steps, test_limit=test_limit),
                             fresh=fresh, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(results["table"])

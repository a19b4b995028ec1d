"""`mpt-edge eval`: accuracy and macro-F1 of a checkpoint (or the zero-shot backbone) on a held-out split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mpt_edge.cli.common import checkpoint_backbone, cli_errors, data_dir, names
from mpt_edge.cli.options import DEFAULT_BACKBONE, BatchSize, CheckpointBackbone, Config, DataDir, MaxLength, Seed

eval_app = typer.Typer()


@eval_app.command("eval")
@cli_errors
def evaluate_command(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint folder (omit with --zero-shot).")] = None,
    config: Config = None, tasks: Annotated[str, typer.Option(help="Tasks (default: the checkpoint's).")] = "",
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    backbone: CheckpointBackbone = None, data: DataDir = None, max_length: MaxLength = 128,
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per task (seeded).")] = None,
    batch_size: BatchSize = 32, seed: Seed = 0,
    zero_shot: Annotated[bool, typer.Option(help="Causal backbone without a prompt.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Accuracy and macro-F1 per task on a held-out split.

    Example: mpt-edge eval runs/mpt --split test   |   mpt-edge eval --zero-shot --tasks rotten_tomatoes
    """
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.errors import ConfigError
    from mpt_edge.evaluate import evaluate_trained, evaluate_zero_shot
    from mpt_edge.trained import load_trained

    if (checkpoint is None) == (not zero_shot):
        raise ConfigError("give a CHECKPOINT folder, or --zero-shot with --tasks (not both)")
    run = load_trained(checkpoint) if checkpoint is not None else None
    task_names = names(tasks) or (run.task_names if run else [])
    for name in task_names:
        if run is not None:
            run.index_of(name)
    data_split = load_split(task_names, data_dir(data), split, limit=limit, seed=seed)
    bb = load_backbone(checkpoint_backbone(run, checkpoint, backbone) if run is not None else backbone or DEFAULT_BACKBONE)
    if run is not None:
        run.check_backbone(bb, checkpoint)
        results = evaluate_trained(bb, run, data_split, max_length=max_length, batch_size=batch_size)
    else:
        results = evaluate_zero_shot(bb, data_split, max_length=max_length, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    typer.echo(f"{'task':<24} {'accuracy':>9} {'macro-F1':>9} {'n':>6}   (generate tasks: exact match, token accuracy)")
    for name, r in results.items():
        second = r["macro_f1"] if "macro_f1" in r else r["token_accuracy"]
        typer.echo(f"{name:<24} {r['accuracy']:>9.4f} {second:>9.4f} {r['n']:>6}")

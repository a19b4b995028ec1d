"""`mpt-edge import-peft` and `export-peft`: PEFT Multitask Prompt Tuning adapters to and from our checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mpt_edge.atomic import check_writable
from mpt_edge.cli.common import checkpoint_backbone, cli_errors, data_dir, names
from mpt_edge.cli.options import DEFAULT_BACKBONE, Backbone, CheckpointBackbone, DataDir

peft_app = typer.Typer()


@peft_app.command("import-peft")
@cli_errors
def import_peft_command(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors).")],
    out: Annotated[Path, typer.Option(help="Output checkpoint folder (a source-stage checkpoint).")],
    tasks: Annotated[str, typer.Option(help="Task names (task folders), one per PEFT task id in order. "
                                            "Optional for adapters written by export-peft.")] = "",
    backbone: Backbone = DEFAULT_BACKBONE, data: DataDir = None,
    max_length: Annotated[Optional[int], typer.Option(help="Input tokens per example for export and eval "
                                                           "(default: the adapter's, else 128).")] = None,
):
    """Read a PEFT MPT adapter into an mpt-edge checkpoint: then `export` it, `eval` it, or adapt it to new
    tasks with `train target --source`.

    Example: mpt-edge import-peft peft-adapter/ --tasks tweet_sentiment,rotten_tomatoes --out runs/from-peft
    """
    check_writable(out, keep=False)
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import task_folder
    from mpt_edge.peft_interop import import_peft, read_peft_adapter
    from mpt_edge.tasks import load_spec

    prompt = read_peft_adapter(adapter)
    specs = [load_spec(task_folder(name, data_dir(data)) / "task.json") for name in names(tasks)] or None
    bb = load_backbone(backbone)
    index = import_peft(prompt, bb, specs, out, max_length)
    l, d = prompt.shared.shape
    typer.echo(f"imported {prompt.cols.shape[0]} tasks (l = {l}, d = {d}, rank {prompt.cols.shape[2]}) → {index.parent}")


@peft_app.command("export-peft")
@cli_errors
def export_peft_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder with one shared prompt (source, or target "
                                                    "--mode factors/group).")],
    out: Annotated[Path, typer.Option(help="Output PEFT adapter folder (must not exist).")],
    backbone: CheckpointBackbone = None,
):
    """Write a checkpoint as a PEFT MPT adapter that `PeftModel.from_pretrained(base, folder)` loads.

    Example: mpt-edge export-peft runs/source --out peft-adapter
    """
    check_writable(out.parent, keep=False)   # the adapter is written in a temp folder beside --out
    from mpt_edge.backbones import load_backbone
    from mpt_edge.peft_interop import peft_prompt_from_trained, write_peft_adapter
    from mpt_edge.trained import load_trained

    trained = load_trained(checkpoint)
    bb = load_backbone(checkpoint_backbone(trained, checkpoint, backbone))
    trained.check_backbone(bb, checkpoint)
    written = write_peft_adapter(peft_prompt_from_trained(trained, bb), out)
    typer.echo(f"wrote a PEFT MultitaskPromptTuning adapter ({len(trained.specs)} tasks; task ids in the order "
               f"{', '.join(trained.task_names)}) → {written}")


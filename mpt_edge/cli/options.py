"""The option types several commands share (`--config`, `--backbone`, `--data`, `--out`, `--quiet`, ...).

Every command takes `--config FILE.toml` whose keys are the command's option names, e.g. `steps = 100` or
`tasks = ["rotten_tomatoes"]`; options given on the command line win. Only typer here: no torch.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

DEFAULT_BACKBONE = "smollm2-135m"   # = mpt_edge.backbones.DEFAULT_BACKBONE (not imported: that module imports torch)


def _load_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    if value is None:
        return value
    try:
        data = tomllib.loads(value.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise typer.BadParameter(f"cannot read {value}: {err}") from None
    known = {p.name for p in ctx.command.params}
    values = {k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {unknown}; allowed: {sorted(known - {'config'})}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


Config = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML file of option values (command-line options win).", callback=_load_config,
    is_eager=True, exists=True, dir_okay=False)]
Backbone = Annotated[str, typer.Option(help="Named backbone (smollm2-135m, minilm-l6) or a local HF folder.")]
CheckpointBackbone = Annotated[Optional[str], typer.Option(
    "--backbone", help="Named backbone (smollm2-135m, minilm-l6) or a local HF folder (default: the "
                       "checkpoint's).")]
Tasks = Annotated[str, typer.Option(help="Comma-separated task names (or task folders).")]
DataDir = Annotated[Optional[Path], typer.Option("--data", help="Folder of task folders (default: cache/data).")]
Out = Annotated[Path, typer.Option(help="Output checkpoint folder.")]
Steps = Annotated[int, typer.Option(help="Optimizer steps (per task when tasks train independently).")]
BatchSize = Annotated[int, typer.Option(help="Examples per step.")]
MaxLength = Annotated[int, typer.Option(help="Input tokens per example (prompt not counted).")]
PromptLength = Annotated[int, typer.Option(help="Prompt vectors l (paper: 100).")]
Rank = Annotated[int, typer.Option(help="Rank r of each task's factor pair (paper: 1).")]
LrPrompt = Annotated[float, typer.Option(help="Adafactor relative-step cap for the prompt P* (paper: 0.3 absolute on T5).")]
LrFactors = Annotated[float, typer.Option(help="Adafactor relative-step cap of U, V (source: 0.4 as in the paper; "
                                                "target: 0.015, or 0.05 in factors mode; docs/method.md 'Learning rates').")]
LrHead = Annotated[float, typer.Option(help="Learning rate of encoder heads.")]
Seed = Annotated[int, typer.Option(help="Seed of initialisation and sampling.")]
KPerClass = Annotated[Optional[int], typer.Option(help="Train on k examples per class (few-shot).")]
CheckpointEvery = Annotated[int, typer.Option(help="Steps between checkpoints.")]
Resume = Annotated[bool, typer.Option(help="Continue the checkpoint in --out.")]
Pooling = Annotated[str, typer.Option(help="Encoder pooling: mean or cls.")]
Quiet = Annotated[bool, typer.Option(help="No progress bar.")]
Warmup = Annotated[int, typer.Option(help="Steps over which every learning rate rises linearly to its value (0 = none).")]
Precision = Annotated[str, typer.Option(help="Training forward: fp32, bf16 (autocast; prompt, optimizer and dev "
                                               "evaluations stay fp32) or auto (bf16 where the CPU has native bf16).")]
Device = Annotated[str, typer.Option(help="cpu, cuda (an error if it cannot be had) or auto.")]
InitText = Annotated[str, typer.Option(help="Text for --init text.")]

"""Helpers every command group uses: the error policy, task-name lists, the data folder, and the backbone of a
checkpoint. Only typer at import time (the error classes load with the runtime's: on the first call)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer


def cli_errors(func):
    """Project errors (`MptEdgeError`, the runtime's `MptEdgeRuntimeError`) become one `error: ...` line on stderr
    and exit code 1: they mean bad input, and their message says the fix. Any other exception is a bug and keeps
    its traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from mpt_edge.errors import USER_ERRORS

        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


def names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def data_dir(data: Optional[Path]) -> Path:
    from mpt_edge.data.fetch import default_data_dir

    return data if data is not None else default_data_dir()


def checkpoint_backbone(trained, source, given: Optional[str]) -> str:
    """The backbone to load for a checkpoint: `given` (--backbone) when set, else the one the checkpoint records.

    A named backbone is recorded by its name; a local folder by the folder's `path` when the checkpoint has it.
    (`Trained.check_backbone` then refuses a backbone that does not fit the checkpoint.)
    """
    if given is not None:
        return given
    from mpt_edge.backbones import NAMED_BACKBONES
    from mpt_edge.errors import CheckpointError

    name, path = trained.meta.backbone.name, trained.meta.backbone.path
    if name in NAMED_BACKBONES:
        return name
    if path and Path(path).is_dir():
        return str(path)
    where = f"the folder {path} is gone" if path else "a local folder whose path it does not record"
    raise CheckpointError(f"{source} was trained on backbone {name!r}, {where}; pass --backbone FOLDER (the Hugging "
                          f"Face folder it was trained on)")

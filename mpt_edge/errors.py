"""Every error that means "bad input" — an option, a config, a file, a checkpoint, a backbone the user gave —
as opposed to a bug. The CLI shows these (and the runtime's `MptEdgeRuntimeError`) as one `error: ...` line;
any other exception keeps its traceback.

Each message says what was found, what was expected, and the fix. The classes that existed before this module
(TaskError, CheckpointError, ...) are still importable from their old modules. Most also subclass ValueError
(or RuntimeError), as they always did, so `except ValueError` in callers keeps working.

A leaf module: it imports nothing of mpt-edge but, on first use of the three names below, the torch-free
runtime's errors; so runtime-only commands (`mpt-edge run`, `inspect`) and `mpt_edge_serve` import it without
torch, `mpt-edge --help` without onnxruntime, and every other module imports it without a cycle.
`UnknownTaskError` is the runtime's: one class for the training side and the runtime alike.
"""

from __future__ import annotations

__all__ = [
    "MptEdgeError", "ConfigError", "RecipeError", "DataError", "TaskError", "DataSourceError", "CheckpointError",
    "BackboneError", "UnsupportedBackboneError", "PackageFetchError", "OutputError", "PeftInteropError",
    "ExportError", "ParityError", "StoreError", "UnknownTaskError", "MptEdgeRuntimeError", "USER_ERRORS",
]


class MptEdgeError(Exception):
    """Base class of mpt-edge's user-facing errors (the runtime's are `MptEdgeRuntimeError`)."""


# -- options and configs ---------------------------------------------------------------------------

class ConfigError(MptEdgeError, ValueError):
    """An option or config value that cannot work (a dataclass check, an option combination); the message
    names the option and the allowed values."""


class RecipeError(ConfigError):
    """A recipe file that cannot be read or does not describe a valid source run."""


# -- data ------------------------------------------------------------------------------------------

class DataError(MptEdgeError, ValueError):
    """Task data that is missing or invalid."""


class TaskError(DataError):
    """A task spec or a data file is invalid."""


class DataSourceError(DataError):
    """A package archive or a file inside it does not hold what its `SourceSpec` expects."""


# -- checkpoints, backbones, packages, outputs -----------------------------------------------------

class CheckpointError(MptEdgeError, ValueError):
    """A checkpoint that is missing, of another format, damaged, or does not fit what it is used with."""


class BackboneError(MptEdgeError, RuntimeError):
    """A backbone that cannot be found, fetched, converted or loaded."""


class UnsupportedBackboneError(MptEdgeError, ValueError):
    """A backbone whose architecture no family adapter handles."""


class PackageFetchError(MptEdgeError, RuntimeError):
    """A registry package could not be downloaded."""


class OutputError(MptEdgeError, ValueError):
    """A file or folder that cannot be written; nothing written before is damaged."""


class PeftInteropError(MptEdgeError, ValueError):
    """A PEFT adapter folder that cannot be read as, or a checkpoint that cannot be written as, PEFT MPT."""


# -- export and serving ----------------------------------------------------------------------------

class ExportError(MptEdgeError, ValueError):
    """An export that cannot proceed (existing output, bad options, inconsistent tasks)."""


class ParityError(ExportError):
    """The graph's outputs differ from PyTorch's by more than the tolerance; `report` has the numbers."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class StoreError(MptEdgeError, RuntimeError):
    """The serve task store cannot be read or written; the message names the path and the fix."""


def __getattr__(name: str):
    """`UnknownTaskError`, `MptEdgeRuntimeError` (the runtime's) and `USER_ERRORS` = (MptEdgeError,
    MptEdgeRuntimeError): the errors a user can catch, and the ones the CLI shows as one line."""
    if name in ("UnknownTaskError", "MptEdgeRuntimeError"):
        from mpt_edge_runtime import errors

        return getattr(errors, name)
    if name == "USER_ERRORS":
        from mpt_edge_runtime.errors import MptEdgeRuntimeError

        return (MptEdgeError, MptEdgeRuntimeError)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

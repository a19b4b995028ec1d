"""Errors that mean "bad input" (shown as one line by the CLI), as opposed to bugs (shown with a traceback).

Kept free of torch so that runtime-only commands (`mpt-edge run`, `inspect`) start without it.
"""

from __future__ import annotations

from mpt_edge.packages import PackageFetchError
from mpt_edge.tasks import UnknownTaskError
from mpt_edge_runtime.errors import MptEdgeRuntimeError


class BackboneError(RuntimeError):
    """A backbone that cannot be found, fetched, converted or loaded."""


# Config checks, task/data/checkpoint/text/export errors and unsupported backbones are all ValueErrors.
USER_ERRORS = (ValueError, UnknownTaskError, BackboneError, PackageFetchError, MptEdgeRuntimeError,
               FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

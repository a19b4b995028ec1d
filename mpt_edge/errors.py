"""Errors that mean "bad input" (shown as one line by the CLI), as opposed to bugs (shown with a traceback)."""

from __future__ import annotations

from mpt_edge.backbones import BackboneError
from mpt_edge.packages import PackageFetchError
from mpt_edge.tasks import UnknownTaskError

# Config checks, task/data/checkpoint/text errors and unsupported backbones are all ValueErrors.
USER_ERRORS = (ValueError, UnknownTaskError, BackboneError, PackageFetchError, FileNotFoundError,
               PermissionError, IsADirectoryError)

"""Errors a runtime user can catch. Each message says what was found, what was expected, and the fix."""


class MptEdgeRuntimeError(Exception):
    """Base class of mpt-edge runtime errors."""


class BundleError(MptEdgeRuntimeError, ValueError):
    """A bundle that is missing files, damaged, of another format version, or inconsistent."""


class UnknownTaskError(MptEdgeRuntimeError, KeyError):
    """A task name that is not among the known tasks: the engine's, or (training side, `mpt_edge`) a checkpoint's
    or the built-in data sources'. `listing` introduces the known names in the message."""

    def __init__(self, name, known, listing: str = "this engine serves"):
        self.name, self.known = name, sorted(known)
        super().__init__(f"unknown task {name!r}; {listing}: {', '.join(self.known) or '(no tasks)'}")

    def __str__(self) -> str:
        return self.args[0]


class InputError(MptEdgeRuntimeError, ValueError):
    """A request the engine cannot serve as given (empty list, wrong type, ...)."""


class DeviceError(MptEdgeRuntimeError):
    """A device that was asked for and cannot be had (never a silent fallback to another)."""

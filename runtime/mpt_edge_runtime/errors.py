"""Errors a runtime user can catch. Each message says what was found, what was expected, and the fix."""


class MptEdgeRuntimeError(Exception):
    """Base class of mpt-edge runtime errors."""


class BundleError(MptEdgeRuntimeError, ValueError):
    """A bundle that is missing files, damaged, of another format version, or inconsistent."""


class UnknownTaskError(MptEdgeRuntimeError, KeyError):
    """A task name the engine does not serve."""

    def __init__(self, name, known):
        self.name, self.known = name, sorted(known)
        super().__init__(f"unknown task {name!r}; this engine serves: {', '.join(self.known) or '(no tasks)'}")

    def __str__(self) -> str:
        return self.args[0]


class InputError(MptEdgeRuntimeError, ValueError):
    """A request the engine cannot serve as given (empty list, wrong type, ...)."""


class DeviceError(MptEdgeRuntimeError):
    """A device that was asked for and cannot be had (never a silent fallback to another)."""

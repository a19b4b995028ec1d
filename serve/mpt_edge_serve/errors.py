"""HTTP errors: what a client did wrong (4xx) or what is unavailable (503), each with a message that says why."""

from __future__ import annotations

from mpt_edge_runtime.errors import BundleError, InputError, UnknownTaskError

RUNTIME_ERRORS = (UnknownTaskError, InputError, BundleError)


class ApiError(Exception):
    """An HTTP error response: status, message, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "message": self.message}}


def runtime_status(err: Exception) -> int:
    """The status of a runtime error: an unknown task is 404, anything else the request asked wrongly is 422."""
    return 404 if isinstance(err, UnknownTaskError) else 422


def error_item(err: Exception) -> dict:
    """A runtime error as the worker returns it to the gateway (plain data, not an exception)."""
    return {"error": {"status": runtime_status(err), "message": str(err)}}


def raise_item(item: dict) -> None:
    """Raise the ApiError of a worker result that holds an error."""
    if "error" in item:
        headers = {"x-replica": str(item["replica"])} if "replica" in item else None
        raise ApiError(item["error"]["status"], item["error"]["message"], headers)

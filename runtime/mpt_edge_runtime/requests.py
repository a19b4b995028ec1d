"""Requests in, token rows out: every (task, text) pair is checked, then tokenized with its task's template.

    encoder = RequestEncoder(tokenizer)
    rows = encoder.encode([("sentiment", "great film"), ...], kind="classify", tasks=table.snapshot())
    rows[0].task, rows[0].ids                      # TaskEntry, list[int] (at most the task's max_length ids)

A bad request anywhere makes the whole call one InputError or UnknownTaskError, before any graph runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from tokenizers import Tokenizer

from mpt_edge_runtime.errors import InputError, UnknownTaskError
from mpt_edge_runtime.task_table import TaskEntry
from mpt_edge_runtime.text import TextError, encode_example, plain_tokenizer, special_tokens


class Row(NamedTuple):
    """One request, ready for a graph: its task and its token ids."""

    task: TaskEntry
    ids: list[int]


def check_texts(texts: object) -> None:
    """`texts` must be a list (any sequence but a string) of texts."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a list of strings, got {type(texts).__name__}; wrap one text in a list")


class RequestEncoder:
    """Checks requests and tokenizes them exactly as training did (`text.encode_example`)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = plain_tokenizer(tokenizer)
        self.specials = special_tokens(self.tokenizer)

    def encode(self, requests: Sequence[tuple[str, str]], kind: str, tasks: Mapping[str, TaskEntry]) -> list[Row]:
        """[(task name, text), ...] of tasks of `kind` ("classify" or "generate") → one Row per request, in order.
        `tasks`: one consistent snapshot of the engine's tasks for the whole call."""
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
            raise InputError("requests must be a non-empty list of (task, text) pairs")
        return [self._row(i, request, kind, tasks) for i, request in enumerate(requests)]

    def _row(self, i: int, request: object, kind: str, tasks: Mapping[str, TaskEntry]) -> Row:
        if not (isinstance(request, (tuple, list)) and len(request) == 2):
            raise InputError(f"request {i} must be a (task, text) pair, got {request!r}")
        name, text = request
        if not isinstance(name, str) or name not in tasks:
            raise UnknownTaskError(name, tasks)
        _check_text(i, text)
        entry = tasks[name]
        if entry.kind != kind:
            verb = "engine.generate / stream" if entry.kind == "generate" else "engine.classify / run"
            raise InputError(f"request {i}: task {name!r} is a {entry.kind} task; use {verb}")
        try:
            ids = encode_example(self.tokenizer, entry.template, {"text": text}, entry.max_length, self.specials)
        except TextError as err:
            raise InputError(f"request {i}: {err}") from None
        if not ids:
            raise InputError(f"request {i}: the text is empty and task {name!r}'s template adds no tokens; "
                             "give some text")
        return Row(entry, ids)


def _check_text(i: int, text: object) -> None:
    """A str that is valid Unicode (no lone surrogates); bytes get a hint to decode them first."""
    if not isinstance(text, str):
        hint = " (decode bytes first, e.g. data.decode('utf-8', errors='replace'))" if isinstance(text, bytes) else ""
        raise InputError(f"request {i}: text must be a string, got {type(text).__name__}{hint}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"request {i}: the text holds a lone surrogate {text[err.start]!r} at character "
                             f"{err.start}, which is not valid Unicode; decode the input with "
                             "errors='replace'") from None

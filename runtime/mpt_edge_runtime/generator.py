"""The generator: decode a batch of rows and release each row's text as pieces, ending at end-of-sequence,
`max_new_tokens` or before the first stop string.

    for i, piece in stream_rows(model, tokenizer, rows, SamplingParams(max_new_tokens=8)):
        texts[i] += piece                           # i: the row's index in `rows`

Pieces never split a character (no U+FFFD of a half-decoded UTF-8 sequence) and never hold any part of a stop
string, so the concatenation of a row's pieces is its final text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer

from mpt_edge_runtime.errors import InputError
from mpt_edge_runtime.generation import decode
from mpt_edge_runtime.model import Model
from mpt_edge_runtime.requests import Row
from mpt_edge_runtime.sampling import SamplingParams


def check_room(model: Model, rows: Sequence[Row], params: SamplingParams) -> None:
    """InputError unless prompt + input + max_new_tokens fit the backbone's positions for every row."""
    limit, prefix = model.manifest.backbone.max_positions, model.manifest.prompt.length
    for i, (_, ids) in enumerate(rows):
        if limit and prefix + len(ids) + params.max_new_tokens > limit:
            raise InputError(f"request {i}: prompt {prefix} + input {len(ids)} + max_new_tokens "
                             f"{params.max_new_tokens} tokens exceed the backbone's {limit} positions; "
                             "lower max_new_tokens or the task's max_length")


def stream_rows(model: Model, tokenizer: Tokenizer, rows: Sequence[Row],
                params: SamplingParams) -> Iterator[tuple[int, str]]:
    """Generate for every row in one batch; yield (row index, text piece) as pieces are ready."""
    check_room(model, rows, params)
    eos = list(model.manifest.graph.eos_token_ids or ())
    streams = [TextStream(tokenizer, params.stop) for _ in rows]
    for tokens in decode(model.runner, [(entry.prefix, ids) for entry, ids in rows], params, eos):
        for i, token in enumerate(tokens):
            if not streams[i].done:
                piece = streams[i].push(int(token), int(token) in eos)
                if piece:
                    yield i, piece
        if all(s.done for s in streams):
            break
    for i, stream in enumerate(streams):
        piece = stream.finish()
        if piece:
            yield i, piece


class TextStream:
    """One row's generated text, released in pieces that never split a character or pass a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0          # characters already yielded
        self.done = False

    def push(self, token: int, is_eos: bool) -> str:
        """Add one generated token; → the text now safe to release (may be "")."""
        if is_eos:
            return self.finish()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut >= 0:
            self.done = True
            return self._release(text[:cut])
        # hold back what could still become a stop string, and an incomplete UTF-8 character
        hold = max((len(s) - 1 for s in self.stop), default=0)
        ready = len(text) - hold if hold else len(text)
        while ready > self.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        return self._release(text[:max(ready, self.sent)])

    def finish(self) -> str:
        """The row ended: → the rest of its text, up to the first stop string."""
        if self.done:
            return ""
        self.done = True
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        return self._release(text[:cut] if cut >= 0 else text)

    def _stop_at(self, text: str) -> int:
        """Where the first stop string starts in `text`, or -1."""
        return min((text.find(s) for s in self.stop if s in text), default=-1)

    def _release(self, text: str) -> str:
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece

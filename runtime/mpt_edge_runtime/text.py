"""Turn an example into token ids: template, truncation of the text fields, special tokens.

Training and the runtime both call `encode_example`, so what is served is tokenized exactly as what
was trained. Only `tokenizers` is used (no torch, no transformers).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from tokenizers import Tokenizer

from mpt_edge_runtime.errors import MptEdgeRuntimeError


class TextError(MptEdgeRuntimeError, ValueError):
    """An example that cannot be turned into tokens (missing field, no room for the text)."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the tokenizer's post-processor puts around one sequence, e.g. BERT's [CLS] ... [SEP]."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]


def plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """Switch off the padding and truncation a tokenizer.json may carry (sentence-transformers files
    pad everything to 128): mpt-edge truncates and pads itself. Returns the same, modified tokenizer."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_tokens(tokenizer: Tokenizer) -> SpecialTokens:
    """Find what the post-processor adds around a single sequence by encoding one probe word."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return SpecialTokens(tuple(full[:start]), tuple(full[start + len(bare):]))
    return SpecialTokens((), ())


def encode_example(
    tokenizer: Tokenizer,
    template: str,
    fields: dict[str, str],
    max_length: int,
    specials: SpecialTokens | None = None,
) -> list[int]:
    """Fill `template` with `fields` and tokenize it into at most `max_length` ids.

    When too long, tokens are cut from the end of the longest text field first, so the template's
    fixed words (e.g. "Sentiment:" at the end) always survive. Returns prefix + ids + suffix.
    """
    specials = specials if specials is not None else special_tokens(tokenizer)
    text, spans = _fill(template, fields)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), list(encoding.offsets)
    budget = max_length - len(specials.prefix) - len(specials.suffix)
    excess = len(ids) - budget
    if excess > 0:
        drop = _tokens_to_drop(text, offsets, spans, excess)
        if drop is None:
            raise TextError(
                f"max_length={max_length} leaves no room for the text: the template {template!r} alone "
                f"takes {len(ids) - sum(len(_in_span(text, offsets, s)) for s in spans)} tokens; raise max_length"
            )
        ids = [t for i, t in enumerate(ids) if i not in drop]
    return [*specials.prefix, *ids, *specials.suffix]


def _fill(template: str, fields: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """Format the template and return the text with the (start, end) char span of every field value."""
    parts, spans, pos = [], [], 0
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(literal)
        pos += len(literal)
        if name is None:
            continue
        if name not in fields:
            raise TextError(f"template {template!r} needs field {name!r}; the example has {sorted(fields)}")
        value = str(fields[name])
        spans.append((pos, pos + len(value)))
        parts.append(value)
        pos += len(value)
    return "".join(parts), spans


def _in_span(text: str, offsets: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """Indices of the field's tokens: those whose first non-space character lies in `span`. Byte-level BPE
    and Metaspace tokens carry the space before a word ("Ġthe", "▁the" start on the template's space), yet
    the word is the field's; a whitespace-only token counts where it starts."""
    start, end = span
    picked = []
    for i, (a, b) in enumerate(offsets):
        piece = text[a:b]
        first = a + len(piece) - len(piece.lstrip()) if piece.strip() else a
        if start <= first < end and b > a:
            picked.append(i)
    return picked


def _tokens_to_drop(text: str, offsets, spans, excess: int) -> set[int] | None:
    """Pick `excess` token indices to drop, always from the end of the currently longest field."""
    kept = [_in_span(text, offsets, s) for s in spans]
    drop: set[int] = set()
    for _ in range(excess):
        longest = max(range(len(kept)), key=lambda k: len(kept[k]), default=None)
        if longest is None or not kept[longest]:
            return None
        drop.add(kept[longest].pop())
    return drop

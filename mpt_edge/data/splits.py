"""Seeded, stratified, deduplicated train/dev/test splits: pure functions over rows.

A row is a dict of the template's fields plus `"label"`, e.g. `{"text": "great film", "label": "fresh"}`.
Everything here is deterministic given the seed: labels are visited in sorted order, rows keep their input
order until a `random.Random(seed)` shuffles them, and nothing depends on set or dict order of strings.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

from mpt_edge.errors import ConfigError

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class DedupStats:
    """What deduplication removed: repeated texts (one copy kept), texts whose copies disagree on the label
    (all copies dropped) and shipped-test texts that also occur in train."""

    duplicates: int = 0
    conflicting: int = 0
    test_in_train: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def normalize_text(text: str, max_chars: int | None = None) -> str:
    """Strip and collapse whitespace; cut to at most `max_chars` characters, at a space where one is near."""
    text = _SPACE.sub(" ", text).strip()
    if max_chars is not None and len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = cut[:space] if space > max_chars // 2 else cut
    return text


def dedup_key(row: dict) -> str:
    """The text a row is compared by: its non-label fields, whitespace-collapsed and case-folded."""
    return "\x1f".join(normalize_text(str(row[k])).casefold() for k in sorted(row) if k != "label")


def conflicting_keys(rows: list[dict]) -> frozenset[str]:
    """Keys of texts that occur with more than one label."""
    labels: dict[str, str] = {}
    conflicts = set()
    for row in rows:
        key = dedup_key(row)
        if labels.setdefault(key, row["label"]) != row["label"]:
            conflicts.add(key)
    return frozenset(conflicts)


def dedupe(rows: list[dict], drop: frozenset[str] = frozenset()) -> tuple[list[dict], int, int]:
    """Keep the first copy of each text; drop every copy of a text with conflicting labels or a key in `drop`.

    Returns `(kept rows in input order, duplicates removed, rows dropped for conflicts or `drop`)`.
    """
    conflicts = conflicting_keys(rows) | drop
    seen: set[str] = set()
    kept, duplicates, dropped = [], 0, 0
    for row in rows:
        key = dedup_key(row)
        if key in conflicts:
            dropped += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            kept.append(row)
    return kept, duplicates, dropped


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split the integer `total` in proportion to `weights` (largest remainder; ties go to the earlier one).

    >>> apportion(10, [8, 1, 1])
    [8, 1, 1]
    """
    mass = sum(weights)
    if total <= 0 or mass <= 0:
        return [0] * len(weights)
    quotas = [total * w / mass for w in weights]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def by_label(rows: list[dict]) -> dict[str, list[dict]]:
    """Group rows by label; labels in sorted order, rows in input order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    return {label: groups[label] for label in sorted(groups)}


def stratified_split(rows: list[dict], fractions: list[float], rng: random.Random) -> list[list[dict]]:
    """Cut `rows` into `len(fractions)` parts with the same label mix; each part comes back shuffled.

    Each label's rows are shuffled and apportioned by `fractions` (e.g. `[0.8, 0.1, 0.1]`); a label's
    first part keeps at least one row.
    """
    parts: list[list[dict]] = [[] for _ in fractions]
    for group in by_label(rows).values():
        group = list(group)
        rng.shuffle(group)
        sizes = apportion(len(group), fractions)
        if sizes[0] == 0 and len(group) > 0:
            sizes[max(range(len(sizes)), key=lambda i: sizes[i])] -= 1
            sizes[0] = 1
        start = 0
        for part, size in zip(parts, sizes):
            part.extend(group[start:start + size])
            start += size
    for part in parts:
        rng.shuffle(part)
    return parts


def cap_stratified(rows: list[dict], limit: int | None) -> list[dict]:
    """The first rows of each label, `limit` in all, keeping the label mix; input order is kept.

    Every label keeps at least one row when `limit` allows it. Taking a prefix (no new randomness) means a
    smaller cap gives a subset of a larger one.
    """
    if limit is None or len(rows) <= limit:
        return list(rows)
    if limit < 0:
        raise ConfigError(f"a split cap must be >= 0 or None, got {limit}")
    counts = Counter(row["label"] for row in rows)
    labels = sorted(counts)
    base = 1 if limit >= len(labels) else 0
    extra = apportion(limit - base * len(labels), [counts[label] - base for label in labels])
    quota = {label: base + n for label, n in zip(labels, extra)}
    kept = []
    for row in rows:
        if quota[row["label"]] > 0:
            quota[row["label"]] -= 1
            kept.append(row)
    return kept


def make_splits(
    rows: list[dict],
    *,
    seed: int,
    test_rows: list[dict] | None = None,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> tuple[dict[str, list[dict]], DedupStats]:
    """Deduplicated, stratified `{"train", "dev", "test"}` rows and what deduplication removed.

    Without `test_rows`, `rows` is cut `1 - dev - test / dev / test`. With `test_rows` (a shipped test
    set), dev is carved from `rows` by `dev_fraction` and test is `test_rows` less any text found in train.
    Texts with conflicting labels are dropped from both. `max_train` caps train, `max_eval` caps dev and test.
    """
    rng = random.Random(seed)
    if test_rows is None:
        kept, duplicates, conflicting = dedupe(rows)
        train, dev, test = stratified_split(kept, [1 - dev_fraction - test_fraction, dev_fraction, test_fraction], rng)
        stats = DedupStats(duplicates, conflicting)
    else:
        conflicts = conflicting_keys(rows + test_rows)
        kept, duplicates, conflicting = dedupe(rows, conflicts)
        train_keys = frozenset(dedup_key(row) for row in kept)
        test_kept, test_dups, test_dropped = dedupe(test_rows, conflicts)
        in_train = sum(1 for row in test_kept if dedup_key(row) in train_keys)
        test_kept = [row for row in test_kept if dedup_key(row) not in train_keys]
        train, dev = stratified_split(kept, [1 - dev_fraction, dev_fraction], rng)
        test = list(test_kept)
        rng.shuffle(test)
        stats = DedupStats(duplicates + test_dups, conflicting + test_dropped, in_train)
    splits = {"train": cap_stratified(train, max_train), "dev": cap_stratified(dev, max_eval),
              "test": cap_stratified(test, max_eval)}
    return splits, stats


def label_counts(rows: list[dict]) -> dict[str, int]:
    """`{label: count}` with labels sorted."""
    counts = Counter(row["label"] for row in rows)
    return {label: counts[label] for label in sorted(counts)}

"""Task specs and labelled examples, read from JSON and JSONL.

A task folder holds `task.json` (a `TaskSpec`) and `train.jsonl` / `dev.jsonl` / `test.jsonl`, one
example per line: the template's fields plus `"label"`, e.g. `{"text": "great film", "label": "positive"}`.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpt_edge.atomic import write_text_atomic
from mpt_edge.errors import TaskError, UnknownTaskError  # noqa: F401  (defined with the other project errors)

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
TASK_KINDS = ("classify", "generate")
VERBALIZER_TOKENS = ("first", "all")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its name, kind, label set and how an example becomes text.

    `template` is a `str.format` string over the example's fields, e.g. "Review: {text}\\nSentiment:";
    `verbalizers` are the words a causal backbone scores for each label (default: the labels themselves).
    kind "generate" (causal backbones) has no labels: each example carries a `target` text, the answer the
    backbone learns to continue the filled template with. `verbalizer_tokens` "first" scores a label by the
    first token of its word (one forward); "all" by the log-probability of the word's whole token sequence
    (causal backbones; multi-token verbalizers).
    """

    name: str
    labels: tuple[str, ...]
    kind: str = "classify"
    template: str = "{text}"
    verbalizers: tuple[str, ...] | None = None
    description: str = ""
    verbalizer_tokens: str = "first"

    def __post_init__(self):
        if not isinstance(self.name, str) or not TASK_NAME.match(self.name):
            raise TaskError(f"task name {self.name!r} is invalid: use lower-case letters, digits, '_', '-', '.'")
        if self.kind not in TASK_KINDS:
            raise TaskError(f"task {self.name!r}: kind {self.kind!r} is not supported; allowed: {', '.join(TASK_KINDS)}")
        object.__setattr__(self, "labels", tuple(self.labels))
        if self.verbalizer_tokens not in VERBALIZER_TOKENS:
            raise TaskError(f"task {self.name!r}: verbalizer_tokens {self.verbalizer_tokens!r} is not one of "
                            f"{', '.join(VERBALIZER_TOKENS)}")
        if self.kind == "generate":
            if self.labels or self.verbalizers:
                raise TaskError(f"task {self.name!r}: a generate task has no labels or verbalizers; its examples "
                                "carry a \"target\" text instead")
        elif len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise TaskError(f"task {self.name!r}: labels must be at least two distinct strings, got {list(self.labels)}")
        if not self.fields:
            raise TaskError(f"task {self.name!r}: template {self.template!r} names no field; use e.g. '{{text}}'")
        if self.verbalizers is not None:
            object.__setattr__(self, "verbalizers", tuple(self.verbalizers))
            if len(self.verbalizers) != len(self.labels):
                raise TaskError(
                    f"task {self.name!r}: {len(self.verbalizers)} verbalizers for {len(self.labels)} labels; "
                    "give one word per label, in label order"
                )

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the example fields the template uses, in order of appearance."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        return tuple(dict.fromkeys(names))

    @property
    def label_words(self) -> tuple[str, ...]:
        return self.verbalizers if self.verbalizers is not None else self.labels

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TaskSpec":
        unknown = set(data) - {f.name for f in cls.__dataclass_fields__.values()}
        if unknown:
            raise TaskError(f"task spec has unknown keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Example:
    """One example: the template's fields and the label's index in `TaskSpec.labels` (classify), or the
    target text with label -1 (generate)."""

    fields: dict[str, str]
    label: int
    target: str = ""


@dataclass
class TaskData:
    """A task with its examples for one split."""

    spec: TaskSpec
    examples: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def load_spec(path: Path) -> TaskSpec:
    """Read a `task.json` file."""
    path = Path(path)
    try:
        return TaskSpec.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise TaskError(f"no task spec at {path}; a task folder needs task.json (run `mpt-edge data fetch`)") from None
    except (json.JSONDecodeError, TypeError) as err:
        raise TaskError(f"{path}: not a valid task spec ({err})") from None


def load_examples(path: Path, spec: TaskSpec) -> list[Example]:
    """Read a JSONL file of examples for `spec`; errors give the file and line number."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"no data file at {path}")
    label_index = {label: i for i, label in enumerate(spec.labels)}
    examples = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            answer = "target" if spec.kind == "generate" else "label"
            missing = [f for f in (*spec.fields, answer) if f not in row]
            if missing:
                raise TaskError(f"{path}:{lineno}: missing field(s) {missing} for task {spec.name!r}")
            if spec.kind == "generate":
                if not isinstance(row["target"], str) or not row["target"]:
                    raise TaskError(f"{path}:{lineno}: target must be a non-empty string, got {row['target']!r}")
                examples.append(Example({f: str(row[f]) for f in spec.fields}, -1, row["target"]))
                continue
            label = row["label"]
            if label not in label_index:
                raise TaskError(
                    f"{path}:{lineno}: label {label!r} is not in task {spec.name!r}'s label set {list(spec.labels)}"
                )
            examples.append(Example({f: str(row[f]) for f in spec.fields}, label_index[label]))
    if not examples:
        raise TaskError(f"{path}: no examples; the file is empty")
    return examples


def load_task(folder: Path, split: str) -> TaskData:
    """Load `<folder>/task.json` and `<folder>/<split>.jsonl`."""
    folder = Path(folder)
    spec = load_spec(folder / "task.json")
    return TaskData(spec, load_examples(folder / f"{split}.jsonl", spec))


def write_task(folder: Path, spec: TaskSpec, splits: dict[str, list[dict]]) -> None:
    """Write a task folder: task.json and one JSONL per split (rows hold fields and the label string)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "task.json", json.dumps(spec.to_json(), indent=2) + "\n")
    for split, rows in splits.items():
        write_text_atomic(folder / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def few_shot(task: TaskData, k_per_class: int, seed: int) -> TaskData:
    """At most `k_per_class` examples of each label, drawn with a seeded shuffle (original order kept)."""
    if k_per_class < 1:
        raise TaskError(f"k per class must be >= 1, got {k_per_class}")
    order = list(range(len(task.examples)))
    random.Random(f"{task.spec.name}:{seed}").shuffle(order)
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        label = task.examples[i].label
        if taken.get(label, 0) < k_per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return TaskData(task.spec, [task.examples[i] for i in sorted(keep)])


def first_n(task: TaskData, limit: int, seed: int) -> TaskData:
    """A seeded random subset of at most `limit` examples (e.g. a smaller test split for quick runs)."""
    if len(task.examples) <= limit:
        return task
    keep = sorted(random.Random(f"{task.spec.name}:{seed}:limit").sample(range(len(task.examples)), limit))
    return TaskData(task.spec, [task.examples[i] for i in keep])

"""The metadata of a trained run, typed: what `checkpoint.json` and a shipped `source.json` record about it.

`RunMeta.from_json(record, where)` validates a record once, when it is read; code then reads attributes, not
string keys. `to_json()` gives the record back in the layout it was read in (fields it does not model, such as
the history, the optimizer state or the provenance, are kept in `extra`), so a round trip changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpt_edge.errors import CheckpointError
from mpt_edge.tasks import TaskSpec

MODELLED = ("stage", "step", "backbone", "tasks", "prompt", "heads", "pooling", "train")


@dataclass(frozen=True)
class BackboneRecord:
    name: str
    family: str
    hidden_size: int
    path: str | None = None       # the local folder it was loaded from, when it was not a named backbone


@dataclass(frozen=True)
class PromptRecord:
    length: int
    rank: int
    groups: int
    task_groups: tuple[int, ...]


@dataclass(frozen=True)
class RunMeta:
    stage: str | None                 # teachers, source, target, pt, spot, head; None in a shipped source
    step: int | None                  # the checkpoint's step; None in a shipped source
    backbone: BackboneRecord
    tasks: tuple[TaskSpec, ...]
    prompt: PromptRecord | None       # None: a head-only run
    heads: bool                       # trained a head per task
    pooling: str | None               # the features' pooling for heads; None for verbalizer families
    train: dict = field(default_factory=dict)   # the run's TrainConfig as saved (older runs lack newer options)
    extra: dict = field(default_factory=dict)   # method settings (mode, factor_init, ...), history, provenance

    @classmethod
    def from_json(cls, record: dict, where: str | Path) -> "RunMeta":
        """Validate `record` (a checkpoint's index or a shipped source's meta); a CheckpointError names `where`."""
        def fail(what: str) -> CheckpointError:
            return CheckpointError(f"{where}: {what}; the file is damaged or not written by mpt-edge: restore it or "
                                   "retrain")

        if not isinstance(record, dict):
            raise fail("the metadata is not a JSON object")
        try:
            backbone = record["backbone"]
            backbone = BackboneRecord(str(backbone["name"]), str(backbone["family"]), int(backbone["hidden_size"]),
                                      backbone.get("path"))
            tasks = tuple(TaskSpec.from_json(t) for t in record["tasks"])
            prompt = record.get("prompt")
            if prompt is not None:
                prompt = PromptRecord(int(prompt["length"]), int(prompt["rank"]), int(prompt["groups"]),
                                      tuple(int(g) for g in prompt["task_groups"]))
        except (KeyError, TypeError, ValueError) as err:
            raise fail(f"its metadata lacks or mangles {err}") from None
        if not tasks:
            raise fail("it names no task")
        if prompt is not None and len(prompt.task_groups) != len(tasks):
            raise fail(f"its prompt maps {len(prompt.task_groups)} tasks to groups but it names {len(tasks)} tasks")
        step = record.get("step")
        return cls(stage=record.get("stage"), step=None if step is None else int(step), backbone=backbone,
                   tasks=tasks, prompt=prompt, heads=bool(record.get("heads")), pooling=record.get("pooling"),
                   train=dict(record.get("train") or {}),
                   extra={k: v for k, v in record.items() if k not in MODELLED})

    def to_json(self) -> dict:
        record = {"backbone": {"name": self.backbone.name, "family": self.backbone.family,
                               "hidden_size": self.backbone.hidden_size,
                               **({"path": self.backbone.path} if self.backbone.path is not None else {})},
                  "tasks": [t.to_json() for t in self.tasks],
                  "prompt": None if self.prompt is None else {
                      "length": self.prompt.length, "rank": self.prompt.rank, "groups": self.prompt.groups,
                      "task_groups": list(self.prompt.task_groups)},
                  "heads": self.heads, "pooling": self.pooling}
        if self.stage is not None:
            record["stage"] = self.stage
        if self.step is not None:
            record["step"] = self.step
        if self.train:
            record["train"] = dict(self.train)
        return {**record, **self.extra}

    @property
    def max_length(self) -> int | None:
        """Input tokens per example the run trained with (None for an imported run that did not say)."""
        return self.train.get("max_length")

    @property
    def history(self) -> list[dict]:
        """The run's logged steps (step, loss and its parts, steps/s), oldest first; empty for a shipped source."""
        return list(self.extra.get("history", []))

    @property
    def provenance(self) -> dict:
        """A shipped source's provenance record (recipe, data, steps, dev accuracy, machine); {} for a checkpoint."""
        return dict(self.extra.get("provenance", {}))

    @property
    def pooling_or_default(self) -> str:
        return self.pooling or "mean"

"""A trained prompt (and heads) read back from a checkpoint, checked against the backbone it meets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mpt_edge.checkpoint import CheckpointError, load_checkpoint
from mpt_edge.heads import TaskHeads
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.run_meta import RunMeta
from mpt_edge.tasks import TaskSpec, UnknownTaskError


@dataclass
class Trained:
    """What a stage produced: task specs (in checkpoint order), prompt, heads and the checkpoint metadata."""

    meta: RunMeta                 # a dict is read (and validated) as a RunMeta
    specs: list[TaskSpec]
    prompt: MultitaskPrompt | None
    heads: TaskHeads | None

    def __post_init__(self):
        if isinstance(self.meta, dict):
            self.meta = RunMeta.from_json(self.meta, "run metadata")

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def index_of(self, name: str) -> int:
        if name not in self.task_names:
            raise UnknownTaskError(name, self.task_names, listing="known tasks")
        return self.task_names.index(name)

    def check_backbone(self, backbone, source: Path) -> None:
        """Refuse a backbone of another family or hidden size than the one this was trained on."""
        info = self.meta.backbone
        hidden = backbone.model.get_input_embeddings().embedding_dim
        if info.hidden_size != hidden or info.family != backbone.family.name:
            raise CheckpointError(
                f"{source} was trained on backbone {info.name!r} ({info.family}, hidden size {info.hidden_size}), "
                f"but backbone {backbone.name!r} is {backbone.family.name} with hidden size {hidden}; "
                f"pass --backbone {info.name}"
            )


def load_trained(folder: Path) -> Trained:
    index, tensors = load_checkpoint(folder)
    meta = RunMeta.from_json(index, Path(folder) / "checkpoint.json")
    specs = list(meta.tasks)
    prompt = MultitaskPrompt.from_tensors(tensors) if meta.prompt is not None else None
    heads = TaskHeads.from_tensors(tensors, len(specs)) if meta.heads else None
    for module in (prompt, heads):
        if module is not None:
            module.requires_grad_(False)
    return Trained(meta, specs, prompt, heads)


def fixed_prompts(trained: Trained) -> torch.Tensor | None:
    """Every task's composed prompt as a constant tensor (T, l, d), or None when there is no prompt."""
    if trained.prompt is None:
        return None
    with torch.no_grad():
        return trained.prompt.fold().detach()

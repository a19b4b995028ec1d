"""Vanilla prompt tuning: task k trains its own prompt P_k (l, d); the factors stay at ones. MPT's teachers
(stage 1), the `pt` baseline, and SPoT (`initial` = a source task's trained prompt) are this method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.methods.building_blocks import choice, classifier_for, hidden, meta, new_heads, sizes, supervised_loss
from mpt_edge.prompt import MultitaskPrompt, PromptConfig
from mpt_edge.prompt_init import identity_factors, init_prompt
from mpt_edge.task_mixing import RoundRobinSampler
from mpt_edge.training_loop import Plan, TrainConfig


class PromptInit(str, Enum):
    VOCAB = "vocab"     # rows of frequent-token embeddings [Lester et al.]
    RANDOM = "random"
    TEXT = "text"       # the embeddings of `init_text`, cycled to length l


@dataclass(frozen=True)
class PromptTuningConfig:
    init: PromptInit = PromptInit.VOCAB
    init_text: str = ""

    def __post_init__(self):
        object.__setattr__(self, "init", choice(PromptInit, self.init, "prompt init"))


def plan(stage: str, backbone, encoded: Sequence[EncodedTask], train: TrainConfig, prompt_config: PromptConfig,
         method: PromptTuningConfig = PromptTuningConfig(), initial: torch.Tensor | None = None,
         pooling: str = "mean") -> Plan:
    """One prompt per task; `initial` (T, l, d) overrides `method.init`."""
    generator = torch.Generator().manual_seed(train.seed)
    specs, tasks, dim = [e.spec for e in encoded], len(encoded), hidden(backbone)
    if initial is None:
        embeddings = backbone.model.get_input_embeddings().weight
        text_ids = (backbone.tokenizer.encode(method.init_text, add_special_tokens=False).ids
                    if method.init is PromptInit.TEXT else ())
        initial = torch.stack([init_prompt(method.init.value, embeddings, prompt_config.length, generator, text_ids)
                               for _ in range(tasks)])
    u, v = identity_factors(tasks, initial.shape[1], 1, dim, generator)
    prompt = MultitaskPrompt(initial, u, v, range(tasks)).set_trainable(shared=True, factors=False)
    heads = new_heads(backbone, specs, generator)
    classifier = classifier_for(backbone, specs, heads, pooling)
    return Plan(stage, prompt, heads, RoundRobinSampler(sizes(encoded), train.batch_size, train.seed),
                supervised_loss(classifier, prompt), train.steps * tasks,
                meta(backbone, specs, prompt, heads, pooling, init=method.init.value))

"""MPT stage 2: one shared prompt P* and rank-r factors (U_k, V_k) per source task, trained with the task loss
plus λ (KL on the label distributions + MSE on hidden states) against the stage-1 teachers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.errors import ConfigError
from mpt_edge.losses import DistillConfig, Totals, batch_task_loss, distillation_loss
from mpt_edge.methods.building_blocks import choice, classifier_for, meta, sizes
from mpt_edge.prompt import MultitaskPrompt
from mpt_edge.prompt_init import identity_factors, init_prompt
from mpt_edge.scoring import Classifier
from mpt_edge.task_mixing import MixtureSampler
from mpt_edge.trained import Trained, fixed_prompts
from mpt_edge.training_loop import SOURCE_LR_FACTORS, Plan, TrainConfig


class SharedInit(str, Enum):
    TEACHERS = "teachers"   # the mean of the teachers' prompts
    VOCAB = "vocab"
    RANDOM = "random"
    TEXT = "text"


@dataclass(frozen=True)
class SourceConfig:
    rank: int = 1
    shared_init: SharedInit = SharedInit.TEACHERS
    init_text: str = ""
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        object.__setattr__(self, "shared_init", choice(SharedInit, self.shared_init, "shared init"))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"source rank must be an integer >= 1, got {self.rank!r}")


def plan(backbone, encoded: Sequence[EncodedTask], teachers: Trained, train: TrainConfig,
         method: SourceConfig = SourceConfig(), pooling: str = "mean") -> Plan:
    generator = torch.Generator().manual_seed(train.seed)
    specs = [e.spec for e in encoded]
    order = [teachers.index_of(s.name) for s in specs]
    teacher_prompts = fixed_prompts(teachers)[order]
    length, dim = teacher_prompts.shape[1], teacher_prompts.shape[2]
    if method.shared_init is SharedInit.TEACHERS:
        shared = teacher_prompts.mean(dim=0)
    else:
        embeddings = backbone.model.get_input_embeddings().weight
        text_ids = (backbone.tokenizer.encode(method.init_text, add_special_tokens=False).ids
                    if method.shared_init is SharedInit.TEXT else ())
        shared = init_prompt(method.shared_init.value, embeddings, length, generator, text_ids)
    u, v = identity_factors(len(specs), length, method.rank, dim, generator)
    prompt = MultitaskPrompt(shared[None], u, v, [0] * len(specs))
    teacher_heads = teachers.heads.select(order) if teachers.heads is not None else None
    heads = teachers.heads.select(order).requires_grad_(True) if teachers.heads is not None else None
    student = classifier_for(backbone, specs, heads, pooling)
    teacher = classifier_for(backbone, specs, teacher_heads, pooling)
    sampler = MixtureSampler(sizes(encoded), train.batch_size, train.seed, train.mixing_cap, train.max_tasks)
    distill = method.distill
    info = meta(backbone, specs, prompt, heads, pooling, shared_init=method.shared_init.value,
                distill={"weight": distill.weight, "temperature": distill.temperature})
    return Plan("source", prompt, heads, sampler, distilled_loss(student, prompt, teacher, teacher_prompts, distill),
                train.steps, info, lr_factors=SOURCE_LR_FACTORS)


def distilled_loss(student: Classifier, prompt: MultitaskPrompt, teacher: Classifier,
                   teacher_prompts: torch.Tensor, distill: DistillConfig):
    """Task loss + λ (KL + hidden MSE) of the student's composed prompts against each task's teacher prompt."""
    def loss_fn(batch, totals: Totals | None = None):
        totals = totals or Totals.of(batch)
        generating = batch.target_mask is not None
        with torch.no_grad():
            teacher_logits, teacher_out = teacher(teacher_prompts[batch.task_ids], batch)
            teacher_answers = teacher.answers(teacher_out, batch) if generating else None
        logits, out = student(prompt.compose(batch.task_ids), batch)
        answers = student.answers(out, batch) if generating else None
        ce = batch_task_loss(logits, batch, answers, totals)
        classify = batch.labels >= 0
        answer_parts = (answers[0], teacher_answers[0]) if generating else None
        decoder = ((out.decoder_hidden, teacher_out.decoder_hidden, out.decoder_mask)
                   if out.decoder_hidden is not None else None)
        extra, parts = distillation_loss(logits[classify], teacher_logits[classify], out.hidden, teacher_out.hidden,
                                         batch.input_mask, distill, answer_parts, decoder, totals)
        return ce + extra, {"ce": ce.item(), **parts}

    return loss_fn

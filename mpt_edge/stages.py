"""The MPT stages and the baselines, each a function that builds a `Plan` for `mpt_edge.training_loop.fit`.

- `prompt_tuning`: vanilla PT, one prompt per task (stage 1 `teachers`; baselines `pt` and `spot`).
- `source`: stage 2, one shared P* and rank-r factors per source task, distilled from the teachers.
- `target`: stage 3 from a source checkpoint, modes `full`, `factors`, `group`.
- `head_only`: encoder baseline without a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpt_edge.batching import EncodedTask
from mpt_edge.errors import ConfigError
from mpt_edge.heads import TaskHeads
from mpt_edge.prompt_init import factors_from_source, identity_factors, init_prompt
from mpt_edge.losses import DistillConfig, Totals, batch_task_loss, distillation_loss
from mpt_edge.prompt import MultitaskPrompt, PromptConfig
from mpt_edge.task_mixing import MixtureSampler, RoundRobinSampler
from mpt_edge.scoring import Classifier, SequenceLabels, VerbalizerScorer
from mpt_edge.tasks import TaskError
from mpt_edge.training_loop import Plan, TrainConfig
from mpt_edge.trained import Trained, fixed_prompts
from mpt_edge_export.families import adapter_for

TARGET_MODES = ("full", "factors", "group")
SHARED_INITS = ("teachers", "vocab", "random", "text")


def classifier_for(backbone, specs, heads: TaskHeads | None, pooling: str = "mean") -> Classifier:
    """Backbone + family adapter + the family's scorer (verbalizers for causal/seq2seq, heads for encoder)."""
    if backbone.family == "encoder" and any(s.kind == "generate" or s.verbalizer_tokens == "all" for s in specs):
        raise TaskError(f"generate tasks and whole-sequence verbalizers need a causal or seq2seq backbone; "
                        f"{backbone.name!r} is {backbone.family}")
    if backbone.family == "encoder":
        if heads is None:
            raise ValueError("the encoder family needs task heads")
        return Classifier(backbone.model, adapter_for("encoder", pooling=pooling), heads)
    # causal: each distinct prompt's positions run once per batch, their KV shared by its rows (same outputs)
    adapter = adapter_for(backbone.family, **({"shared_prefix": True} if backbone.family == "causal" else {}))
    return Classifier(backbone.model, adapter, VerbalizerScorer.build(adapter, backbone.model, specs, backbone.tokenizer),
                      SequenceLabels.build(specs, backbone.tokenizer))


def prompt_tuning(stage: str, backbone, encoded: Sequence[EncodedTask], config: TrainConfig,
                  prompt_config: PromptConfig, init: str = "vocab", init_text: str = "",
                  initial: torch.Tensor | None = None, pooling: str = "mean") -> Plan:
    """Vanilla PT: task k trains its own prompt P_k (l, d); factors stay at ones. `initial` (T, l, d) overrides init."""
    generator = torch.Generator().manual_seed(config.seed)
    specs, tasks, dim = [e.spec for e in encoded], len(encoded), _hidden(backbone)
    if initial is None:
        embeddings = backbone.model.get_input_embeddings().weight
        text_ids = backbone.tokenizer.encode(init_text, add_special_tokens=False).ids if init == "text" else ()
        initial = torch.stack([init_prompt(init, embeddings, prompt_config.length, generator, text_ids)
                               for _ in range(tasks)])
    u, v = identity_factors(tasks, initial.shape[1], 1, dim, generator)
    prompt = MultitaskPrompt(initial, u, v, range(tasks)).set_trainable(shared=True, factors=False)
    heads = new_heads(backbone, specs, generator)
    classifier = classifier_for(backbone, specs, heads, pooling)
    return Plan(stage, prompt, heads, RoundRobinSampler(_sizes(encoded), config.batch_size, config.seed),
                supervised_loss(classifier, prompt), config.steps * tasks,
                _meta(backbone, specs, prompt, heads, pooling, init=init))


def head_only(backbone, encoded: Sequence[EncodedTask], config: TrainConfig, pooling: str = "mean") -> Plan:
    """Encoder baseline: no prompt, only the per-task heads train."""
    if backbone.family != "encoder":
        raise TaskError(f"the {backbone.family} family has no head to train; its no-prompt baseline is zero-shot: "
                        "`mpt-edge eval --zero-shot`")
    generator = torch.Generator().manual_seed(config.seed)
    specs = [e.spec for e in encoded]
    heads = new_heads(backbone, specs, generator)
    classifier = classifier_for(backbone, specs, heads, pooling)
    return Plan("head", None, heads, RoundRobinSampler(_sizes(encoded), config.batch_size, config.seed),
                supervised_loss(classifier, None), config.steps * len(specs),
                _meta(backbone, specs, None, heads, pooling))


def source(backbone, encoded: Sequence[EncodedTask], teachers: Trained, config: TrainConfig, rank: int = 1,
           distill: DistillConfig = DistillConfig(), shared_init: str = "teachers", init_text: str = "",
           pooling: str = "mean") -> Plan:
    """Stage 2: shared P* + per-task rank-r factors, task loss + λ (KL + hidden MSE) against the teachers."""
    if shared_init not in SHARED_INITS:
        raise ConfigError(f"shared init {shared_init!r} is not supported; allowed: {', '.join(SHARED_INITS)}")
    generator = torch.Generator().manual_seed(config.seed)
    specs = [e.spec for e in encoded]
    order = [teachers.index_of(s.name) for s in specs]
    teacher_prompts = fixed_prompts(teachers)[order]
    length, dim = teacher_prompts.shape[1], teacher_prompts.shape[2]
    if shared_init == "teachers":
        shared = teacher_prompts.mean(dim=0)
    else:
        embeddings = backbone.model.get_input_embeddings().weight
        text_ids = backbone.tokenizer.encode(init_text, add_special_tokens=False).ids if shared_init == "text" else ()
        shared = init_prompt(shared_init, embeddings, length, generator, text_ids)
    u, v = identity_factors(len(specs), length, rank, dim, generator)
    prompt = MultitaskPrompt(shared[None], u, v, [0] * len(specs))
    teacher_heads = teachers.heads.select(order) if teachers.heads is not None else None
    heads = teachers.heads.select(order).requires_grad_(True) if teachers.heads is not None else None
    student = classifier_for(backbone, specs, heads, pooling)
    teacher = classifier_for(backbone, specs, teacher_heads, pooling)
    sampler = MixtureSampler(_sizes(encoded), config.batch_size, config.seed, config.mixing_cap, config.max_tasks)
    meta = _meta(backbone, specs, prompt, heads, pooling, shared_init=shared_init,
                 distill={"weight": distill.weight, "temperature": distill.temperature})
    return Plan("source", prompt, heads, sampler, distilled_loss(student, prompt, teacher, teacher_prompts, distill),
                config.steps, meta)


def target(backbone, encoded: Sequence[EncodedTask], source_run: Trained, config: TrainConfig, mode: str = "full",
           factor_init: str | None = None, pooling: str = "mean") -> Plan:
    """Stage 3: P* from the source; U, V by `factor_init`: "mean" of the source factors [paper], a source
    task's name (its exact pair), or "shared-only" (factors start at ones: only P* transfers).

    full: each task trains its own copy of P* and its factors; factors: P* frozen and shared, only U, V
    train; group: the tasks share one trained P*, each with its own factors.
    """
    if mode not in TARGET_MODES:
        raise ConfigError(f"target mode {mode!r} is not supported; allowed: {', '.join(TARGET_MODES)}")
    if source_run.prompt is None:
        raise TaskError("the source checkpoint holds no prompt; pass the output folder of `mpt-edge train source`")
    generator = torch.Generator().manual_seed(config.seed)
    specs, tasks = [e.spec for e in encoded], len(encoded)
    src = source_run.prompt.tensors()
    shared0 = src["prompt.shared"][0]
    if factor_init == "shared-only":
        u, v = identity_factors(tasks, shared0.shape[0], src["prompt.u"].shape[2], shared0.shape[1], generator)
    else:
        pick = None if factor_init in (None, "mean") else source_run.index_of(factor_init)
        u, v = factors_from_source(src["prompt.u"], src["prompt.v"], tasks, pick)
    if mode == "full":
        prompt = MultitaskPrompt(shared0.expand(tasks, *shared0.shape), u, v, range(tasks))
    else:
        prompt = MultitaskPrompt(shared0[None], u, v, [0] * tasks).set_trainable(shared=mode == "group", factors=True)
    heads = new_heads(backbone, specs, generator)
    classifier = classifier_for(backbone, specs, heads, pooling)
    if mode == "group":
        sampler = MixtureSampler(_sizes(encoded), config.batch_size, config.seed, config.mixing_cap, config.max_tasks)
        total = config.steps
    else:
        sampler, total = RoundRobinSampler(_sizes(encoded), config.batch_size, config.seed), config.steps * tasks
    meta = _meta(backbone, specs, prompt, heads, pooling, mode=mode, factor_init=factor_init or "mean",
                 source_tasks=source_run.task_names)
    return Plan("target", prompt, heads, sampler, supervised_loss(classifier, prompt), total, meta)


def supervised_loss(classifier: Classifier, prompt: MultitaskPrompt | None):
    def loss_fn(batch, totals: Totals | None = None):
        prompts = prompt.compose(batch.task_ids) if prompt is not None else None
        logits, out = classifier(prompts, batch)
        answers = classifier.answers(out, batch) if batch.target_mask is not None else None
        return batch_task_loss(logits, batch, answers, totals), {}

    return loss_fn


def distilled_loss(student: Classifier, prompt: MultitaskPrompt, teacher: Classifier,
                   teacher_prompts: torch.Tensor, distill: DistillConfig):
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


def _hidden(backbone) -> int:
    return backbone.model.get_input_embeddings().embedding_dim


def _sizes(encoded: Sequence[EncodedTask]) -> tuple[int, ...]:
    return tuple(len(e) for e in encoded)


def new_heads(backbone, specs, generator) -> TaskHeads | None:
    """Fresh random heads, one per task (C_k × d), for encoder backbones; None for causal ones."""
    if backbone.family != "encoder":
        return None
    return TaskHeads.random([len(s.labels) for s in specs], _hidden(backbone), generator)


def _meta(backbone, specs, prompt: MultitaskPrompt | None, heads: TaskHeads | None, pooling: str, **extra) -> dict:
    return {
        "backbone": {"name": backbone.name, "family": backbone.family, "hidden_size": _hidden(backbone)},
        "tasks": [s.to_json() for s in specs],
        "prompt": None if prompt is None else {"length": prompt.length, "rank": prompt.rank,
                                               "groups": len(prompt.shared), "task_groups": prompt.task_groups.tolist()},
        "heads": heads is not None,
        "pooling": pooling if backbone.family == "encoder" else None,
        **extra,
    }

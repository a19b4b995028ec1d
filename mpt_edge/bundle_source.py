"""From a trained checkpoint and its backbone to what the exporter writes (`BundleSource`).

Causal tasks get a "head" too: the output-embedding rows of their verbalizer tokens (and the LM head's bias
where it has one), so the runtime scores every family the same way: logits = features @ Wᵀ + b.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import mpt_edge
from mpt_edge.scoring import verbalizer_ids, verbalizer_sequences
from mpt_edge.trained import Trained
from mpt_edge_export.bundle_writer import BundleSource, ExportError, ExportTask

CALIBRATION_ROWS = 64   # per task; activation maxima settle within a few batches


def backbone_facts(backbone) -> dict:
    config = backbone.model.config
    return {
        "name": backbone.name,
        "model_type": config.model_type,
        "hidden_size": backbone.model.get_input_embeddings().embedding_dim,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_heads": getattr(config, "num_attention_heads", None),
        "num_kv_heads": getattr(config, "num_key_value_heads", getattr(config, "num_attention_heads", None)),
        "vocab_size": backbone.model.get_input_embeddings().num_embeddings,
        "max_positions": getattr(config, "max_position_embeddings", None),
    }


def bundle_source(trained: Trained, backbone) -> BundleSource:
    """Shared prompts, per-task factors and heads of `trained`, ready for `write_bundle`."""
    if trained.prompt is None:
        raise ExportError("this checkpoint has no prompt (a head-only baseline); bundles serve prompted tasks")
    tensors = trained.prompt.tensors()
    max_length = trained.meta.max_length
    tasks = []
    for k, spec in enumerate(trained.specs):
        weight, bias, ids = _head(trained, backbone, k)
        tasks.append(ExportTask(
            spec={"name": spec.name, "kind": spec.kind, "labels": list(spec.labels), "template": spec.template,
                  "verbalizers": list(spec.label_words), "group": int(tensors["prompt.task_groups"][k]),
                  "max_length": max_length, **_sequences(spec, backbone)},
            u=tensors["prompt.u"][k].numpy(), v=tensors["prompt.v"][k].numpy(), head_weight=weight, head_bias=bias,
            head_ids=ids))
    pooling = trained.meta.pooling_or_default
    adapter = backbone.family.adapter(pooling=pooling)
    return BundleSource(
        family=backbone.family.name, backbone=backbone_facts(backbone), model=backbone.model, adapter=adapter,
        tokenizer=backbone.tokenizer, groups=[g.numpy() for g in tensors["prompt.shared"]], tasks=tasks,
        extra={"versions": {"mpt-edge": mpt_edge.__version__}, "pooling": pooling if backbone.family.uses_heads else None,
               "source_checkpoint": {"stage": trained.meta.stage, "step": trained.meta.step}})


def calibration_rows(trained: Trained, backbone, data: Path, per_task: int = CALIBRATION_ROWS) -> dict[str, list[list[int]]]:
    """Token ids of up to `per_task` training examples of each task, encoded as the runtime encodes requests: the
    rows calibrated quantization (`--quantize int8-smooth`) measures activation ranges on (train split: the dev
    split stays for the accuracy check)."""
    from mpt_edge.batching import encode_tasks
    from mpt_edge.datasets import load_split

    train = load_split([s.name for s in trained.specs], data, "train", limit=per_task)
    return {e.spec.name: e.ids for e in encode_tasks(train, backbone.tokenizer, trained.meta.max_length)}


def _sequences(spec, backbone) -> dict:
    """Whole-sequence verbalizers: the runtime scores these token ids with the generation graph."""
    if spec.verbalizer_tokens != "all":
        return {}
    return {"verbalizer_tokens": "all", "verbalizer_ids": verbalizer_sequences(spec, backbone.tokenizer)}


def _head(trained: Trained, backbone, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Task k's head → weight (C, d), bias (C,) and, for verbalizer heads (rows of the output embedding), the
    token ids (C,) the bundle stores instead of the rows."""
    if trained.heads is not None:
        return trained.heads.weight[k].detach().numpy(), trained.heads.bias[k].detach().numpy(), None
    if trained.specs[k].verbalizer_tokens == "all":  # scored by sequences, not by a head: a placeholder
        dim = backbone.model.get_input_embeddings().embedding_dim
        labels = len(trained.specs[k].labels)
        return np.zeros((labels, dim), np.float32), np.zeros(labels, np.float32), None
    ids = torch.tensor(verbalizer_ids(trained.specs[k], backbone.tokenizer), dtype=torch.long)
    head = backbone.model.get_output_embeddings()
    bias = head.bias[ids] if getattr(head, "bias", None) is not None else torch.zeros(len(ids))
    return head.weight[ids].detach().numpy().copy(), bias.detach().numpy().copy(), ids.numpy().copy()

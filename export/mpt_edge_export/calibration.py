"""Calibration feeds: a bundle's own prompts and real token rows, shaped for the graph a calibrated quantization
recipe (`transform.CALIBRATED`) measures activation ranges on.

    feeds = calibration_feeds(graph_path, kind, prompts_and_rows)   # [(prompt (l, d), [ids, ...]), ...]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from mpt_edge.errors import ExportError
from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.generation import right_padded

BATCH = 8


def calibration_feeds(graph: Path, kind: str, tasks: Sequence[tuple[np.ndarray, Sequence[Sequence[int]]]],
                      batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    """One feed per `batch` rows of each task: [its prompt (l, d) | the row's tokens], right-padded, as the features
    graph takes it or as the fused generation graph's prefill from scratch (no cached KV) takes it."""
    if kind not in (fmt.FEATURES_KIND, fmt.FUSED_DECODER_KIND):
        raise ExportError(f"calibrated quantization runs on the features graph or the fused generation graph, not a "
                          f"{kind!r} graph: export without --kv-cache, or choose a recipe that needs no calibration")
    past = _empty_past(graph) if kind == fmt.FUSED_DECODER_KIND else {}
    feeds = []
    for prompt, rows in tasks:
        rows = [list(r) for r in rows if len(r)]
        for start in range(0, len(rows), batch):
            ids, mask = right_padded(rows[start:start + batch])
            prompts = np.repeat(np.asarray(prompt, np.float32)[None], len(ids), axis=0)
            if kind == fmt.FEATURES_KIND:
                feeds.append({fmt.INPUT_IDS: ids, fmt.ATTENTION_MASK: mask, fmt.PROMPT_EMBEDS: prompts})
                continue
            lengths = prompts.shape[1] + mask.sum(axis=1)
            feeds.append({fmt.INPUT_IDS: ids, fmt.PROMPT_EMBEDS: prompts, fmt.STEP_LENGTHS: lengths,
                          fmt.TOTAL_LENGTHS: lengths,
                          **{name: np.zeros((len(ids), *shape), np.float32) for name, shape in past.items()}})
    return feeds


def _empty_past(graph: Path) -> dict[str, tuple[int, int, int]]:
    """{past input name: (kv heads, 0, head dim)} of a fused generation graph: an empty cache per row."""
    shapes = {}
    for value in onnx.load(str(graph), load_external_data=False).graph.input:
        if value.name.startswith("past."):
            _, heads, _, head_dim = (d.dim_value for d in value.type.tensor_type.shape.dim)
            shapes[value.name] = (heads, 0, head_dim)
    return shapes

"""Parity of an exported graph against PyTorch, as an ordinary function with its own error type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mpt_edge.errors import ParityError  # noqa: F401  (defined with the other project errors)
from mpt_edge_export.graph import PromptedFeatures, sample_inputs
from mpt_edge_runtime import format as fmt


def parity_cases(max_length: int) -> list[tuple[int, int]]:
    """(batch, sequence) shapes: batch 1 and > 1, padded rows, short and max-length inputs."""
    return [(1, 3), (1, max_length), (4, min(16, max_length)), (3, max_length)]


def parity_report(wrapper: PromptedFeatures, graph: Path, prompt_length: int, hidden: int, vocab: int,
                  max_length: int, dtype=np.float32) -> dict:
    """Run PyTorch and onnxruntime (CPU) on every parity case; max abs difference and cosine per case."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1234)
    cases = []
    for batch, length in parity_cases(max_length):
        ids, mask, prompts = sample_inputs(batch, length, prompt_length, hidden, vocab, generator)
        with torch.no_grad():
            expected = wrapper(ids, mask, prompts).float().numpy()
        got = session.run([fmt.FEATURES], {fmt.INPUT_IDS: ids.numpy(), fmt.ATTENTION_MASK: mask.numpy(),
                                           fmt.PROMPT_EMBEDS: prompts.numpy().astype(dtype)})[0].astype(np.float32)
        cosine = float(np.min(np.sum(expected * got, -1) /
                              (np.linalg.norm(expected, axis=-1) * np.linalg.norm(got, axis=-1) + 1e-12)))
        cases.append({"batch": batch, "sequence": length, "max_abs_diff": float(np.abs(expected - got).max()),
                      "scale": float(np.abs(expected).max()), "min_cosine": cosine})
    return {"output": fmt.FEATURES, "cases": cases,
            "max_abs_diff": max(c["max_abs_diff"] for c in cases), "min_cosine": min(c["min_cosine"] for c in cases)}


def check_parity(report: dict, tolerance: float) -> dict:
    """Return the report, or raise ParityError when the worst relative difference exceeds `tolerance`."""
    worst = max(c["max_abs_diff"] / max(c["scale"], 1.0) for c in report["cases"])
    report = {**report, "tolerance": tolerance, "max_rel_diff": worst}
    if worst > tolerance:
        rows = "; ".join(f"batch {c['batch']} × {c['sequence']}: max abs diff {c['max_abs_diff']:.3g} "
                         f"(scale {c['scale']:.3g})" for c in report["cases"])
        raise ParityError(f"exported graph differs from PyTorch by {worst:.3g} (relative) > tolerance {tolerance:g}: "
                          f"{rows}", report)
    return report

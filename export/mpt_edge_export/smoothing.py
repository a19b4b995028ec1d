"""SmoothQuant (Xiao et al., 2023) on an ONNX graph: move the activation outliers of every weight MatMul's input
channels into its weights, so that int8 activations keep their resolution.

    ranges = activation_ranges(graph, feeds)           # max |X_j| per input channel, from calibration rows
    smooth(graph, smoothed, ranges, alpha=0.5)          # then quantize `smoothed` (dynamic int8, per channel)

For an input X (..., K) read by MatMuls with constant weights W (K, N), channel j gets
s_j = max|X_j|^α / max|W_j|^(1-α) (W_j: row j of every such weight); the graph then computes (X · 1/s)(diag(s) W),
the same product in exact arithmetic, with one Mul per input tensor (shared by the MatMuls that read it: q, k, v
or gate and up).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from mpt_edge.errors import ExportError

EPS = 1e-5


def weight_matmuls(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """{activation input name: the MatMul nodes that multiply it by a constant 2D weight}."""
    weights = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in weights:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def activation_ranges(graph: Path, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Max |x| per last-axis channel (K,) of every weight MatMul's input, over the calibration `feeds`."""
    model = onnx.load(str(graph))
    names = sorted(weight_matmuls(model))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
                              if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every named tensor
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            if value.size:   # padded positions may hold NaN (attention over no key): they do not count
                magnitude = np.abs(value.reshape(-1, value.shape[-1]))
                channel_max = np.where(np.isfinite(magnitude), magnitude, 0.0).max(axis=0)
                ranges[name] = np.maximum(ranges.get(name, channel_max), channel_max)
    if not ranges:
        raise ExportError("calibration ran no rows through the graph's MatMuls: give at least one non-empty row")
    return ranges


def spread(channel_max: np.ndarray) -> float:
    """Largest channel range over the median one: with one int8 scale per tensor, the median channel gets about
    256 / spread quantization steps."""
    return float(channel_max.max() / max(float(np.median(channel_max)), EPS))


def smooth(src: Path, dst: Path, ranges: dict[str, np.ndarray], alpha: float = 0.5,
           max_spread: float = float("inf")) -> dict:
    """`src` with every calibrated MatMul input smoothed (see the module docstring) written to `dst`. An input
    whose smoothed channel ranges still `spread` more than `max_spread` is left as it was, and its MatMuls are
    listed under "keep_fp32" (int8 activations cannot resolve it: keep those in fp32)."""
    if not 0.0 <= alpha <= 1.0:
        raise ExportError(f"SmoothQuant's alpha is in [0, 1], not {alpha}")
    model = onnx.load(str(src))
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups = {name: nodes for name, nodes in weight_matmuls(model).items() if name in ranges}
    inserted, keep = {}, []
    for name, nodes in list(groups.items()):
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = (np.maximum(ranges[name], EPS) ** alpha / np.maximum(weight_max, EPS) ** (1 - alpha)).astype(np.float32)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)
        if spread(ranges[name] / scale) > max_spread:
            keep += [n.name for n in nodes]
            del groups[name]
            continue
        for node, weight in zip(nodes, weights):
            scaled = numpy_helper.from_array((weight * scale[:, None]).astype(np.float32),
                                             node.input[1] if uses[node.input[1]] == 1 else f"{node.name}.smoothed_weight")
            if scaled.name == node.input[1]:
                initializers[scaled.name].CopyFrom(scaled)
            else:   # a weight other nodes read too (a tied table): this MatMul gets its own scaled copy
                model.graph.initializer.append(scaled)
                node.input[1] = scaled.name
            node.input[0] = f"{name}.smoothed"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / scale, f"{name}.smooth_scale"))
        inserted[name] = helper.make_node("Mul", [name, f"{name}.smooth_scale"], [f"{name}.smoothed"],
                                          name=f"{name}.smooth")
    nodes = []
    for node in model.graph.node:   # each Mul goes right before the first MatMul that reads its output
        for name in [n for n in inserted if f"{n}.smoothed" in node.input]:
            nodes.append(inserted.pop(name))
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return {"smoothed_inputs": len(groups), "smoothed_matmuls": sum(len(n) for n in groups.values()), "alpha": alpha,
            "keep_fp32": keep}

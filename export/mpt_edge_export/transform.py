"""Graph transforms after export: fused transformer ops, onnxruntime offline optimization, dynamic int8
quantization, fp16.

Each takes a graph file and writes another; parity is checked by the caller.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from mpt_edge.errors import ExportError

# name → (per-channel weights, regex of MatMul node names kept in fp32)
INT8_RECIPES = {
    "int8": (False, None),                           # every MatMul, per-tensor: fastest, least accurate
    "int8-per-channel": (True, None),                # every MatMul, per-channel weights
    # FFN output projections in fp32 (Llama-style down_proj, GPT-2 mlp.c_proj, T5 wo; BERT's output.dense
    # pattern also matches its attention.output.dense)
    "int8-mixed": (False, r"down_proj|mlp[/.]c_proj|output/dense|output\.dense|DenseReluDense[/.]wo"),
}
DTYPES = ("fp32", "fp16")


def op_counts(graph: Path) -> Counter:
    """How many nodes of each op type the graph holds ("com.microsoft:Attention" for contrib ops)."""
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in nodes)


def fuse(src: Path, dst: Path, model_type: str, num_heads: int = 0, hidden_size: int = 0) -> dict:
    """onnxruntime.transformers' fusions (Attention, SkipLayerNormalization, BiasGelu, ... as com.microsoft contrib
    ops) written as a plain ONNX file; no onnxruntime session optimizations are baked in (portable). The attention
    mask stays the raw 2D mask (`use_raw_attention_mask`): exact for any mask, where onnxruntime's BERT default
    (one end index per row) assumes right padding. num_heads / hidden_size 0: detected from the graph.
    → {model_type, nodes before and after, fused contrib ops and their counts}."""
    from onnxruntime.transformers import optimizer   # imports its modules top-level (fusion_options, onnx_model, ...)

    options = optimizer.FusionOptions(model_type)     # the class optimize_model knows (not a second import of it)
    options.use_raw_attention_mask(True)
    model = optimizer.optimize_model(str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
                                     optimization_options=options, opt_level=0)
    model.save_model_to_file(str(dst))
    before, after = op_counts(src), op_counts(dst)
    fused = {op.split(":", 1)[1]: n for op, n in sorted(after.items()) if op.startswith("com.microsoft:")}
    return {"model_type": model_type, "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
            "fused_ops": fused}


def optimize(src: Path, dst: Path) -> None:
    """onnxruntime's extended graph optimizations, saved offline (portable: no hardware-specific layouts)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=options, providers=["CPUExecutionProvider"])


def quantize_int8(src: Path, dst: Path, recipe: str = "int8") -> dict:
    """Dynamic int8 quantization of MatMul weights (CPU); returns what was quantized and what was kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if recipe not in INT8_RECIPES:
        raise ExportError(f"quantization recipe {recipe!r} is not one of {', '.join(INT8_RECIPES)}")
    per_channel, keep = INT8_RECIPES[recipe]
    nodes = onnx.load(str(src), load_external_data=False).graph.node
    # onnxruntime quantizes a weight Gemm (GPT-2's Conv1D) as the MatMul it rewrites it into, `<name>_MatMul`
    matmuls = [n.name if n.op_type == "MatMul" else f"{n.name}_MatMul" for n in nodes
               if n.op_type in ("MatMul", "Gemm")]
    excluded = [n for n in matmuls if keep and re.search(keep, n)]
    # per-channel weights fill [-127, 127] in every column, where u8 × s8 products saturate int16 on x86 CPUs
    # without VNNI (AVX2, AVX-512 before Cascade Lake): 7-bit weights there, as onnxruntime advises
    reduce_range = per_channel
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return {"recipe": recipe, "per_channel": per_channel, "reduce_range": reduce_range, "matmuls": len(matmuls),
            "kept_fp32": len(excluded)}


def to_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and activations, fp16 prompt input and features output (for CUDA)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False, disable_shape_infer=True)
    onnx.save(model, str(dst))

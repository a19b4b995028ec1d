"""Graph transforms after export: onnxruntime offline optimization, dynamic int8 quantization, fp16.

Each takes a graph file and writes another; parity is checked by the caller.
"""

from __future__ import annotations

import re
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

"""Graph transforms after export: fused transformer ops, onnxruntime offline optimization, quantization
(dynamic int8, or block-wise weight-only int4 / int8 as MatMulNBits), fp16.

Each takes a graph file and writes another; parity is checked by the caller.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mpt_edge.errors import ExportError
from mpt_edge_export import smoothing

# the FFN output projections (Llama-style down_proj, GPT-2 mlp.c_proj, T5 wo; BERT's output.dense pattern also
# matches its attention.output.dense), the MatMuls most sensitive to int8 activations
FFN_OUTPUT = r"down_proj|mlp[/.]c_proj|output/dense|output\.dense|DenseReluDense[/.]wo"


@dataclass(frozen=True)
class DynamicInt8:
    """onnxruntime's dynamic quantization: int8 MatMul weights (per tensor or per output channel), activations
    quantized per call (DynamicQuantizeLinear + MatMulInteger); MatMuls whose name matches `keep_fp32` stay fp32."""

    per_channel: bool = False
    keep_fp32: str | None = None


@dataclass(frozen=True)
class WeightOnly:
    """Block-wise weight-only quantization (MatMulNBits): `bits`-bit weights with one fp32 scale per `block_size`
    input rows of each column; activations stay fp32. `accuracy_level` 4 lets the CPU kernel quantize activations
    to int8 per block and compute in int8 (VNNI / AMX / AVX2 paths); 1 dequantizes the weights and computes in
    fp32. MatMuls whose name matches `keep_fp32` stay fp32."""

    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    keep_fp32: str | None = None

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ExportError(f"weight-only quantization takes 4 or 8 bits, not {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"block_size must be a power of two >= 16, not {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level is 0 to 4 (onnxruntime's MatMulNBits), not {self.accuracy_level}")


@dataclass(frozen=True)
class SmoothInt8:
    """SmoothQuant (`smoothing.py`): each weight MatMul's activation outliers moved into its weights with strength
    `alpha`, from calibration rows run through the graph, then dynamic int8 with per-channel weights."""

    alpha: float = 0.5
    max_spread: float = float("inf")   # an input still spread wider after smoothing keeps its MatMuls in fp32
    keep_fp32: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ExportError(f"SmoothQuant's alpha is in [0, 1], not {self.alpha}")
        if self.max_spread < 1.0:
            raise ExportError(f"max_spread is a ratio of channel ranges (>= 1), not {self.max_spread}")


QUANT_RECIPES: dict[str, DynamicInt8 | WeightOnly | SmoothInt8] = {
    "int8": DynamicInt8(),                            # every MatMul, per-tensor: fast, least accurate
    "int8-per-channel": DynamicInt8(per_channel=True),
    "int8-mixed": DynamicInt8(keep_fp32=FFN_OUTPUT),  # FFN output projections in fp32
    "int8-mixed-per-channel": DynamicInt8(per_channel=True, keep_fp32=FFN_OUTPUT),   # both: the recommended
    "int4": WeightOnly(bits=4),                       # onnxruntime-genai's CPU default: block 32, int8 compute
    "int4-fp32": WeightOnly(bits=4, accuracy_level=1),  # int4 weights, fp32 compute
    "int8-block": WeightOnly(bits=8),                 # 8-bit blocks, int8 compute
    "int8-smooth": SmoothInt8(alpha=0.8),             # SmoothQuant + per-channel int8 (needs calibration rows)
}
CALIBRATED = tuple(name for name, spec in QUANT_RECIPES.items() if isinstance(spec, SmoothInt8))
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


def quantize(src: Path, dst: Path, recipe: str, calibration: Sequence[dict[str, np.ndarray]] = ()) -> dict:
    """`src` quantized by the named recipe of QUANT_RECIPES into `dst`; returns what was quantized and kept.
    `calibration`: graph feeds to measure activation ranges with (the recipes in CALIBRATED need them)."""
    if recipe not in QUANT_RECIPES:
        raise ExportError(f"quantization recipe {recipe!r} is not one of {', '.join(QUANT_RECIPES)}")
    spec = QUANT_RECIPES[recipe]
    matmuls = weight_matmul_names(src)
    kept = [n for n in matmuls if spec.keep_fp32 and re.search(spec.keep_fp32, n)]
    if isinstance(spec, SmoothInt8):
        if not calibration:
            raise ExportError(f"--quantize {recipe} measures activation ranges on calibration rows: give the "
                              "tasks' training data (mpt-edge export --data DIR), or choose another recipe")
        smoothed = dst.with_name(dst.name + ".smoothed")
        try:
            report = smoothing.smooth(src, smoothed, smoothing.activation_ranges(src, calibration), spec.alpha,
                                      spec.max_spread)
            kept += [n for n in report.pop("keep_fp32") if n not in kept]
            report |= _dynamic_int8(smoothed, dst, DynamicInt8(per_channel=True), kept)
        finally:
            smoothed.unlink(missing_ok=True)
        return {"recipe": recipe, **report, "calibration_feeds": len(calibration), "matmuls": len(matmuls),
                "kept_fp32": len(kept), "kept_fp32_nodes": kept}
    method = _weight_only if isinstance(spec, WeightOnly) else _dynamic_int8
    return {"recipe": recipe, **method(src, dst, spec, kept), "matmuls": len(matmuls), "kept_fp32": len(kept)}


def weight_matmul_names(src: Path) -> list[str]:
    """Names of the MatMul / Gemm nodes a recipe may quantize; a Gemm (GPT-2's Conv1D) is named as the MatMul
    onnxruntime's int8 pass rewrites it into, `<name>_MatMul`."""
    nodes = onnx.load(str(src), load_external_data=False).graph.node
    return [n.name if n.op_type == "MatMul" else f"{n.name}_MatMul" for n in nodes if n.op_type in ("MatMul", "Gemm")]


def _dynamic_int8(src: Path, dst: Path, spec: DynamicInt8, kept: list[str]) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per-channel weights fill [-127, 127] in every column, where u8 × s8 products saturate int16 on x86 CPUs
    # without VNNI (AVX2, AVX-512 before Cascade Lake): 7-bit weights there, as onnxruntime advises
    reduce_range = spec.per_channel
    # outputs of contrib ops (the fused decoder's GroupQueryAttention) have no inferred type: they are float
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=spec.per_channel,
                     reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=kept,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return {"method": "dynamic-int8", "per_channel": spec.per_channel, "reduce_range": reduce_range}


def _weight_only(src: Path, dst: Path, spec: WeightOnly, kept: list[str]) -> dict:
    """MatMulNBits for every MatMul with a 2D constant weight (a Gemm is left in fp32)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as err:   # onnxruntime's quantizer needs onnx-ir, which the `train` extra installs
        raise ExportError(f"weight-only quantization needs onnxruntime's MatMulNBits quantizer ({err}): "
                          'pip install "mpt-edge[train]" (or pip install onnx-ir)') from None

    config = DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                          accuracy_level=spec.accuracy_level, bits=spec.bits,
                                          op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=spec.bits, block_size=spec.block_size,
                                     is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level,
                                     nodes_to_exclude=kept, algo_config=config)
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")   # a line per node at INFO
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        chatty.setLevel(level)
    onnx.save(quantizer.model.model, str(dst))
    return {"method": "weight-only", "bits": spec.bits, "block_size": spec.block_size,
            "accuracy_level": spec.accuracy_level, "symmetric": spec.symmetric,
            "quantized": op_counts(dst).get("com.microsoft:MatMulNBits", 0)}


def to_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and activations, fp16 prompt input and features output (for CUDA)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False, disable_shape_infer=True)
    onnx.save(model, str(dst))

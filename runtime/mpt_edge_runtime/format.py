"""Bundle format version 3: file names, graph input/output names, tensor keys. Writer and reader share these.

    manifest.json        format_version, family, backbone facts, graph (file, inputs, outputs, opset, dtype),
                         prompt (length, hidden_size), sha256 of every file, tool versions, parity report
    model.onnx[.data]    the backbone graph: (input_ids, attention_mask, prompt_embeds) → features
    decoder.onnx         instead of model.onnx for causal bundles with generation: one step with a KV cache
                         (kind "decoder": traced; "decoder-fused": onnxruntime contrib ops, GroupQueryAttention)
    encoder.onnx         seq2seq bundles with generation: encoder + decoder step 0 (with decoder.onnx: one step)
    tokenizer.json       a `tokenizers` file
    prompts.safetensors  groups.<g>.shared (l, d); tasks.<name>.u (l, r), .v (r, d), and either a learned head
                         .head.weight (C, d), .head.bias (C,) (encoders) or .head.ids (C,) int64 verbalizer token ids
                         whose rows live once per bundle in verbalizer.ids (R,), .weight (R, d), .bias (R,) (causal)
    tasks.json           {"tasks": [{name, kind, labels, template, verbalizers, group, max_length}, ...]}

Version 1 stored every task's head rows (C, d) in full; version 2 had no fused decoder graph (graph kind
"decoder-fused"); the runtime reads both.
"""

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
GRAPH = "model.onnx"
TOKENIZER = "tokenizer.json"
PROMPTS = "prompts.safetensors"
TASKS = "tasks.json"

INPUT_IDS, ATTENTION_MASK, PROMPT_EMBEDS = "input_ids", "attention_mask", "prompt_embeds"
FEATURES = "features"

# graph inputs and outputs as data: name → {axis: dynamic dimension name}
GRAPH_INPUTS = {
    INPUT_IDS: {0: "batch", 1: "sequence"},
    ATTENTION_MASK: {0: "batch", 1: "sequence"},
    PROMPT_EMBEDS: {0: "batch", 1: "prompt_length"},
}
GRAPH_OUTPUTS = {FEATURES: {0: "batch"}}


def shared_key(group: int) -> str:
    return f"groups.{group}.shared"


def task_key(task: str, part: str) -> str:
    """part: "u", "v", "head.weight", "head.bias" or "head.ids"."""
    return f"tasks.{task}.{part}"


# the output-embedding rows (and LM-head bias) of every verbalizer token of a causal bundle's tasks, stored once
VERBALIZER_IDS, VERBALIZER_WEIGHT, VERBALIZER_BIAS = "verbalizer.ids", "verbalizer.weight", "verbalizer.bias"

# A bundle holds one graph; manifest["graph"]["kind"] says which (bundles without "kind" hold the features graph).
FEATURES_KIND, DECODER_KIND = "features", "decoder"

# The causal generation graph (`decoder.onnx`): one step with a KV cache; see mpt_edge_export.families.causal.graphs.
DECODER_GRAPH = "decoder.onnx"
POSITION_IDS, LOGITS = "position_ids", "logits"
DECODER_INPUTS = {
    INPUT_IDS: {0: "batch", 1: "sequence"},
    ATTENTION_MASK: {0: "batch", 1: "total"},
    POSITION_IDS: {0: "batch", 1: "prompt_and_sequence"},
    PROMPT_EMBEDS: {0: "batch", 1: "prompt_length"},
}
DECODER_OUTPUTS = {LOGITS: {0: "batch"}, FEATURES: {0: "batch"}}

# The fused causal generation graph (same file name, kind "decoder-fused"): onnxruntime's contrib ops, rows
# right-padded and packed from cache position 0; see mpt_edge_export.families.causal.fused.
FUSED_DECODER_KIND = "decoder-fused"
STEP_LENGTHS, TOTAL_LENGTHS = "step_lengths", "total_lengths"
FUSED_DECODER_INPUTS = {
    INPUT_IDS: {0: "batch", 1: "sequence"},
    PROMPT_EMBEDS: {0: "batch", 1: "prompt_length"},
    STEP_LENGTHS: {0: "batch"},
    TOTAL_LENGTHS: {0: "batch"},
}


def past_name(layer: int, part: str) -> str:
    """part: "key" or "value"."""
    return f"past.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    return f"present.{layer}.{part}"


# The seq2seq generation graphs (mpt_edge_export.families.seq2seq.graphs): `encoder.onnx` runs the encoder over
# [prompt | input] and decoder step 0 (graph "file"); `decoder.onnx` is one decode step (graph "decoder_file").
SEQ2SEQ_KIND = "seq2seq"
ENCODER_GRAPH = "encoder.onnx"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
SEQ2SEQ_STEP_INPUTS = {
    INPUT_IDS: {0: "batch", 1: "sequence"},
    ENCODER_ATTENTION_MASK: {0: "batch", 1: "encoder"},
}


def cross_name(layer: int, part: str) -> str:
    """The cross-attention KV of decoder layer `layer`; part: "key" or "value"."""
    return f"cross.{layer}.{part}"


def cache_names(prefix: str, layers: int) -> list[str]:
    """`<prefix>.<i>.key`, `<prefix>.<i>.value` for every layer, in graph order; prefix: past, present or cross."""
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]

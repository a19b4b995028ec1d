"""Real subword tokenizers (byte-level BPE and SentencePiece-style Unigram, trained in-process) with tiny
random backbones of every family: leading-space verbalizers, truncation at field edges, padding, and
streaming text whose multi-byte characters are split across tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          T5Config, T5ForConditionalGeneration)

from conftest import subword_tokenizer
from mpt_edge import stages
from mpt_edge.backbones import Backbone
from mpt_edge.batching import collate, encode_tasks, eos_id
from mpt_edge.bundle_source import bundle_source
from mpt_edge.prompt import PromptConfig
from mpt_edge.scoring import verbalizer_ids
from mpt_edge.tasks import Example, TaskData, TaskSpec
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import Trained, fixed_prompts, load_trained
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle
from mpt_edge_runtime import Engine, load
from mpt_edge_runtime.text import encode_example, special_tokens

PAD, EOS, CLS = 0, 1, 3  # SUBWORD_SPECIALS ids
MAX_LENGTH = 24
TEMPLATE = "Review: {text} Sentiment:"
POLARITY = TaskSpec("polarity", ("negative", "positive"), template=TEMPLATE, verbalizers=("bad", "good"))
ROWS = [("the film was really good", 1), ("a dull plot and awful acting", 0), ("great story, quite fine", 1),
        ("the plot is bad and sad", 0)]
TEXTS = ["good", "the café was fine", "a dull plot, awful 日😀 acting and a sad story", "naïve"]
DIGITS = "0123456789"  # never in the corpus: one token per character (BPE bytes, Unigram byte fallback)
SYMBOLS = "#$%&*+<=>@^|~"  # the same


def llama_config(vocab: int, tied: bool = True) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
                       initializer_range=0.3, tie_word_embeddings=tied)


def tiny_backbone(family: str, kind: str) -> Backbone:
    """A tiny random backbone of `family` sized to the `kind` tokenizer's vocabulary."""
    tokenizer = subword_tokenizer(kind)
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.3,
                            bos_token_id=EOS, eos_token_id=EOS)
        return Backbone("tiny-gpt2", "causal", GPT2LMHeadModel(config).eval().requires_grad_(False), tokenizer, None)
    if family == "llama":
        return Backbone("tiny-llama", "causal", LlamaForCausalLM(llama_config(vocab)).eval().requires_grad_(False),
                        tokenizer, None)
    if family == "bert":
        tokenizer.post_processor = TemplateProcessing(single="<cls> $A </s>", special_tokens=[("<cls>", CLS), ("</s>", EOS)])
        config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3)
        return Backbone("tiny-bert", "encoder", BertModel(config, add_pooling_layer=False).eval().requires_grad_(False),
                        tokenizer, None)
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])  # as T5's
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, initializer_factor=1.5)
    return Backbone("tiny-t5", "seq2seq", T5ForConditionalGeneration(config).eval().requires_grad_(False), tokenizer, None)


@dataclass
class Served:
    backbone: Backbone
    kind: str
    trained: Trained
    engine: Engine


def serve(backbone: Backbone, tasks: list[TaskData], out, kv_cache: bool | None = None) -> tuple[Trained, Engine]:
    """Train two steps (a real checkpoint), export it and load the bundle with the runtime."""
    encoded = encode_tasks(tasks, backbone.tokenizer, MAX_LENGTH, eos_id(backbone.model))
    config = TrainConfig(steps=2, batch_size=4, max_length=MAX_LENGTH, checkpoint_every=2)
    fit(stages.prompt_tuning("pt", backbone, encoded, config, PromptConfig(length=4)), encoded, config, out / "run",
        progress=False)
    trained = load_trained(out / "run")
    write_bundle(bundle_source(trained, backbone), out / "bundle", ExportOptions(max_length=MAX_LENGTH, kv_cache=kv_cache))
    return trained, load(out / "bundle", "cpu")


@pytest.fixture(scope="module", params=["gpt2-bpe", "llama-unigram", "bert-bpe", "t5-unigram"])
def served(request, tmp_path_factory):
    """A polarity bundle per family; the Llama one serves classification from the KV-cache decoder graph
    (left padding), the others from the features graph (right padding)."""
    family, kind = request.param.split("-")
    backbone = tiny_backbone(family, kind)
    task = TaskData(POLARITY, [Example({"text": text}, label) for text, label in ROWS])
    trained, engine = serve(backbone, [task], tmp_path_factory.mktemp(request.param),
                            kv_cache=True if family == "llama" else None)
    return Served(backbone, kind, trained, engine)


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def training_probabilities(served: Served, texts: list[str]) -> torch.Tensor:
    """Label probabilities as training scores them (right-padded batch, the checkpoint's prompt and heads)."""
    task = TaskData(POLARITY, [Example({"text": text}, 0) for text in texts])
    encoded = encode_tasks([task], served.backbone.tokenizer, MAX_LENGTH)
    batch = collate(encoded, [(0, i) for i in range(len(texts))], pad_id=PAD)
    classifier = stages.classifier_for(served.backbone, served.trained.specs, served.trained.heads,
                                       served.trained.meta.pooling_or_default)
    logits, _ = classifier(fixed_prompts(served.trained)[batch.task_ids], batch)
    return torch.softmax(logits, dim=-1)


def runtime_probabilities(engine: Engine, texts: list[str]) -> np.ndarray:
    return np.array([[p.probabilities[label] for label in POLARITY.labels]
                     for p in engine.classify("polarity", texts)])


# -- verbalizers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("served", ["gpt2-bpe", "llama-unigram", "t5-unigram"], indirect=True)  # encoders: heads
def test_verbalizers_are_the_label_words_first_token_as_it_follows_the_template(served):
    tokenizer = served.backbone.tokenizer
    filled = TEMPLATE.format(text="the plot")
    expected = []
    for word in POLARITY.verbalizers:
        before, after = ids_of(tokenizer, filled), ids_of(tokenizer, f"{filled} {word}")
        assert after[:len(before)] == before
        expected.append(after[len(before)])
    assert verbalizer_ids(POLARITY, tokenizer) == expected
    if served.kind == "bpe":  # byte-level BPE: " good" and "good" start with different tokens
        assert [ids_of(tokenizer, word)[0] for word in POLARITY.verbalizers] != expected
    head = served.backbone.model.get_output_embeddings().weight[expected].numpy()
    np.testing.assert_array_equal(served.engine.task("polarity").head_weight, head)
    np.testing.assert_allclose(runtime_probabilities(served.engine, TEXTS),
                               training_probabilities(served, TEXTS).numpy(), atol=1e-4)


# -- padding ---------------------------------------------------------------------------------------


def test_padded_batch_gives_each_row_its_result_alone(served):
    tokenizer = served.backbone.tokenizer
    lengths = {len(ids_of(tokenizer, text)) for text in TEXTS}
    assert len(lengths) == len(TEXTS), "rows of different lengths, so the batch is padded"
    batched = runtime_probabilities(served.engine, TEXTS)
    alone = np.concatenate([runtime_probabilities(served.engine, [text]) for text in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    trained_batched = training_probabilities(served, TEXTS)
    trained_alone = torch.cat([training_probabilities(served, [text]) for text in TEXTS])
    torch.testing.assert_close(trained_batched, trained_alone, atol=1e-5, rtol=1e-4)


# -- truncation ------------------------------------------------------------------------------------


def test_runtime_cuts_a_long_text_from_its_end(served):
    """A text past max_length is served exactly as its first characters (never as its last ones)."""
    tokenizer, specials = served.backbone.tokenizer, special_tokens(served.backbone.tokenizer)
    text = DIGITS + SYMBOLS
    length = {n: len(encode_example(tokenizer, TEMPLATE, {"text": text[:n]}, 10**6, specials)) for n in range(len(text))}
    kept = [n for n, count in length.items() if count == MAX_LENGTH]
    assert len(kept) == 1 and kept[0] < len(text) - 1
    head, tail = text[:kept[0]], text[-kept[0]:]
    assert encode_example(tokenizer, TEMPLATE, {"text": text}, MAX_LENGTH, specials) == \
        encode_example(tokenizer, TEMPLATE, {"text": head}, MAX_LENGTH, specials)
    served_long, served_head, served_tail = (runtime_probabilities(served.engine, [t]) for t in (text, head, tail))
    np.testing.assert_array_equal(served_long, served_head)
    assert not np.array_equal(served_long, served_tail)


PAIR = "Premise: {premise} Hypothesis: {hypothesis} Answer:"


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
@pytest.mark.parametrize("post", ["none", "cls-sep"])
@pytest.mark.parametrize("premise, hypothesis, excess, kept", [
    pytest.param(DIGITS, "QZXJVW", 3, (7, 6), id="first-longest"),
    pytest.param(DIGITS, "QZXJVW", 6, (5, 5), id="both-alternately"),  # ties: the first field
    pytest.param("0123", "QZXJVW", 2, (4, 4), id="second-longest"),
])
def test_truncation_cuts_the_end_of_the_longest_field_and_keeps_the_template(kind, post, premise, hypothesis,
                                                                              excess, kept):
    tokenizer = subword_tokenizer(kind)
    if post == "cls-sep":
        tokenizer.post_processor = TemplateProcessing(single="<cls> $A </s>", special_tokens=[("<cls>", CLS), ("</s>", EOS)])
    specials = special_tokens(tokenizer)

    def encoded(p: str, h: str, max_length: int = 10**6) -> list[int]:
        return encode_example(tokenizer, PAIR, {"premise": p, "hypothesis": h}, max_length, specials)

    full = encoded(premise, hypothesis)
    field_ids = [i for i in full if i not in encoded("", "")]
    assert len(field_ids) == len(set(field_ids)) == len(premise + hypothesis), "one distinct token per character"
    expected = encoded(premise[:kept[0]], hypothesis[:kept[1]])
    assert len(expected) == len(full) - excess
    assert encoded(premise, hypothesis, len(full) - excess) == expected
    assert expected != encoded(premise[-kept[0]:], hypothesis[-kept[1]:])  # a cut from the start differs


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_a_fields_first_token_carrying_the_templates_space_counts_as_the_fields(kind):
    """' the' after "Hypothesis:" is one token (Ġthe, ▁the) that starts on the template's space; it is the
    hypothesis's token, so the hypothesis, one token longer than the premise, is the field that is cut."""
    tokenizer = subword_tokenizer(kind)
    specials = special_tokens(tokenizer)
    template = "{premise} Hypothesis: {hypothesis} Answer:"
    hypothesis = "the team won"
    hypothesis_tokens = ids_of(tokenizer, " " + hypothesis)
    assert tokenizer.id_to_token(hypothesis_tokens[0]) in ("Ġthe", "▁the")
    premise = next(DIGITS[:n] for n in range(1, 10) if len(ids_of(tokenizer, DIGITS[:n])) == len(hypothesis_tokens) - 1)
    full = encode_example(tokenizer, template, {"premise": premise, "hypothesis": hypothesis}, 10**6, specials)
    suffix = ids_of(tokenizer, " Answer:")
    assert full[-len(suffix) - len(hypothesis_tokens):] == hypothesis_tokens + suffix
    cut = encode_example(tokenizer, template, {"premise": premise, "hypothesis": hypothesis}, len(full) - 1, specials)
    assert cut == full[:-len(suffix) - 1] + suffix


# -- streaming -------------------------------------------------------------------------------------


def successor_llama(tokenizer: Tokenizer, chain: list[int]) -> Backbone:
    """A Llama whose greedy continuation of chain[i] is chain[i + 1]: attention and MLP write nothing, so the
    last hidden state is the current token's (unit) embedding, and chain[i + 1]'s output row is that embedding."""
    assert len(set(chain)) == len(chain)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tokenizer.get_vocab_size(), tied=False)).eval().requires_grad_(False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.copy_(torch.nn.functional.normalize(embeddings, dim=-1))
        model.lm_head.weight.zero_()
        for current, following in zip(chain, chain[1:]):
            model.lm_head.weight[following] = 10 * embeddings[current]
    return Backbone("successor-llama", "causal", model, tokenizer, None)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_streaming_holds_back_characters_split_across_tokens(kind, tmp_path):
    tokenizer = subword_tokenizer(kind)
    prompt_text, answer = "Say:", " naïve日😀"  # ï's two bytes land in two tokens (BPE: "aÃ", "¯")
    answer_ids = ids_of(tokenizer, answer)
    partial = [tokenizer.decode(answer_ids[:n]) for n in range(1, len(answer_ids))]
    assert sum("\ufffd" in text for text in partial) >= 4, "the answer's characters span several tokens"
    backbone = successor_llama(tokenizer, [ids_of(tokenizer, prompt_text)[-1], *answer_ids, EOS])
    spec = TaskSpec("say", (), kind="generate", template="{text}")
    _, engine = serve(backbone, [TaskData(spec, [Example({"text": prompt_text}, -1, answer)] * 4)], tmp_path)
    expected = tokenizer.decode(answer_ids)
    assert expected == (answer if kind == "bpe" else answer.lstrip())  # Metaspace drops the leading space
    final = engine.generate("say", [prompt_text], max_new_tokens=len(answer_ids) + 4)[0]
    assert final == expected
    pieces = list(engine.stream("say", prompt_text, max_new_tokens=len(answer_ids) + 4))
    assert len(pieces) > 3 and "".join(pieces) == final
    assert not [piece for piece in pieces if "\ufffd" in piece]

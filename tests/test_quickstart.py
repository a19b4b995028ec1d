"""The quickstart end to end on tiny backbones: sources → teachers → source → MPT and PT → bundle → runtime."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_bert_backbone
from mpt_edge.quickstart import QuickstartConfig, run_quickstart


@pytest.fixture
def bert_folder(workspace, tmp_path):
    backbone = tiny_bert_backbone()
    backbone.model.save_pretrained(tmp_path / "tiny-bert")
    backbone.tokenizer.save(str(tmp_path / "tiny-bert" / "tokenizer.json"))
    return tmp_path / "tiny-bert"


@pytest.mark.parametrize("family", ["causal", "encoder"])
def test_quickstart_runs_every_stage_and_serves_the_bundle(family, workspace, bert_folder, tmp_path):
    backbone = workspace / "tiny-llama" if family == "causal" else bert_folder
    config = QuickstartConfig(out=tmp_path / "qs", backbone=str(backbone), sources=("polarity", "topic"),
                              target="mood", steps=2, k_per_class=4, source_k_per_class=4, test_limit=8,
                              prompt_length=3, max_length=24, batch_size=4, data=workspace / "data")
    results = run_quickstart(config, log=lambda message: None)
    floor = "zero-shot" if family == "causal" else "head only"
    assert list(results["scores"]) == [floor, "pt", "mpt (full)", "mpt (runtime)"]
    assert all(0 <= s["accuracy"] <= 1 and s["n"] == 8 for s in results["scores"].values())
    assert results["scores"]["mpt (runtime)"]["accuracy"] == results["scores"]["mpt (full)"]["accuracy"]
    assert {"teachers", "source", "mpt", "pt", f"eval {floor}", "eval pt", "eval mpt", "export", "runtime"} \
        <= set(results["timings"])
    kind = json.loads((tmp_path / "qs" / "bundle" / "manifest.json").read_text())["graph"]["kind"]
    assert kind.startswith("decoder") if family == "causal" else kind == "features"   # causal: cached prompt KV

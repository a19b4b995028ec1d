"""Bundle format v2: a causal task stores its verbalizer token ids; their output-embedding rows live once per
bundle. Version 1 bundles (rows per task) still load and give the same predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mpt_edge.bundle_source import bundle_source
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle
import mpt_edge_runtime as mer
from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import file_sha256, task_tensors
from test_export_runtime import texts_for, trained_checkpoint


@pytest.fixture
def causal_bundle(llama, tmp_path):
    trained = trained_checkpoint(llama, tmp_path)
    write_bundle(bundle_source(trained, llama), tmp_path / "bundle", ExportOptions(max_length=24))
    return llama, trained, tmp_path / "bundle"


def _rewrite_prompts(folder, change, version=None):
    """Change prompts.safetensors (and optionally format_version), keeping the manifest's hashes true."""
    path = folder / fmt.PROMPTS
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    manifest = json.loads((folder / fmt.MANIFEST).read_text())
    manifest["files"][fmt.PROMPTS] = file_sha256(path)
    if version is not None:
        manifest["format_version"] = version
    (folder / fmt.MANIFEST).write_text(json.dumps(manifest))


def test_causal_task_stores_ids_and_the_table_holds_each_row_once(causal_bundle):
    backbone, trained, bundle = causal_bundle
    tensors = load_file(str(bundle / fmt.PROMPTS))
    rows = backbone.model.get_output_embeddings().weight.detach().numpy()
    table = tensors[fmt.VERBALIZER_IDS]
    assert len(set(table.tolist())) == len(table)
    np.testing.assert_array_equal(tensors[fmt.VERBALIZER_WEIGHT], rows[table])
    d = rows.shape[1]
    for spec in trained.specs:
        parts = task_tensors(tensors, spec.name)
        assert set(parts) == {"u", "v", "head.ids"}
        assert set(parts["head.ids"].tolist()) <= set(table.tolist())
        length, rank = parts["u"].shape
        assert sum(p.nbytes for p in parts.values()) == 4 * (length * rank + rank * d) + 8 * len(spec.labels)


def test_version_1_bundle_with_rows_per_task_gives_the_same_predictions(causal_bundle):
    _, trained, bundle = causal_bundle
    engine = mer.load(bundle, device="cpu")
    expected = {t: engine.classify(t, texts_for(t)) for t in engine.tasks}

    def to_version_1(tensors):
        table = {int(token): row for row, token in enumerate(tensors.pop(fmt.VERBALIZER_IDS))}
        weight, bias = tensors.pop(fmt.VERBALIZER_WEIGHT), tensors.pop(fmt.VERBALIZER_BIAS)
        for spec in trained.specs:
            rows = [table[int(i)] for i in tensors.pop(fmt.task_key(spec.name, "head.ids"))]
            tensors[fmt.task_key(spec.name, "head.weight")] = weight[rows]
            tensors[fmt.task_key(spec.name, "head.bias")] = bias[rows]

    _rewrite_prompts(bundle, to_version_1, version=1)
    old = mer.load(bundle, device="cpu")
    for task, predictions in expected.items():
        for got, want in zip(old.classify(task, texts_for(task)), predictions):
            assert got.label == want.label
            assert got.probabilities == pytest.approx(want.probabilities, abs=1e-6)


def test_a_token_missing_from_the_table_is_refused(causal_bundle):
    _, trained, bundle = causal_bundle
    name = trained.specs[0].name

    def drop_first_row(tensors):
        ids = tensors[fmt.task_key(name, "head.ids")]
        keep = tensors[fmt.VERBALIZER_IDS] != ids[0]
        for key in (fmt.VERBALIZER_IDS, fmt.VERBALIZER_WEIGHT, fmt.VERBALIZER_BIAS):
            tensors[key] = np.ascontiguousarray(tensors[key][keep])

    _rewrite_prompts(bundle, drop_first_row)
    with pytest.raises(mer.BundleError, match=rf"task {name!r} names verbalizer token ids .* table lacks"):
        mer.load(bundle, device="cpu")

"""Bundle format versions against stored fixtures (tests/fixtures/bundles, made by tests/fixtures/make_bundles.py):
every readable version loads and answers exactly as it did when the fixture was made; the manifest reads into
`Manifest` and writes back byte for byte; versions this runtime cannot read are refused with what to do.
No torch: these bundles are files in the repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import mpt_edge_runtime as mer
from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import file_sha256, read_manifest
from mpt_edge_runtime.manifest import Manifest

FIXTURES = Path(__file__).parent / "fixtures" / "bundles"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
BUNDLES = sorted(EXPECTED["bundles"])
VERSIONS = {"v1-features": 1, "v2-decoder": 2, "v2-features": 2, "v3-decoder-fused": 3}


def test_the_fixtures_cover_every_readable_version_and_stay_small():
    assert sorted(set(VERSIONS.values())) == list(fmt.READABLE_VERSIONS) and fmt.FORMAT_VERSION in VERSIONS.values()
    assert set(BUNDLES) == set(VERSIONS)
    files = [p for p in FIXTURES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_500_000
    assert {p.suffix for p in files} <= {".json", ".onnx", ".safetensors"}


@pytest.mark.parametrize("name", BUNDLES)
def test_a_stored_bundle_answers_as_when_it_was_made(name):
    engine = mer.load(FIXTURES / name, device="cpu", threads=1)
    assert engine.manifest.format_version == VERSIONS[name]
    want, texts = EXPECTED["bundles"][name], EXPECTED["texts"]
    assert engine.tasks == sorted(want)
    for task, expected in want.items():
        if engine.task(task).kind == "classify":
            got = engine.classify(task, texts)
            assert [p.label for p in got] == [e["label"] for e in expected]
            for prediction, e in zip(got, expected):
                assert prediction.probabilities == pytest.approx(e["probabilities"], abs=1e-5)
        else:
            params = mer.SamplingParams(**EXPECTED["generate"])
            assert engine.generate(task, texts, params) == expected["greedy"]
            assert engine.generate(task, texts, params, stop=["a"]) == expected["stop_a"]
            assert "".join(engine.stream(task, texts[0], params)) == expected["greedy"][0]


@pytest.mark.parametrize("name", BUNDLES)
def test_the_manifest_reads_typed_and_writes_back_byte_for_byte(name):
    text = (FIXTURES / name / fmt.MANIFEST).read_text()
    manifest = read_manifest(FIXTURES / name)
    assert isinstance(manifest, Manifest) and manifest.prompt.length == 3 and manifest.backbone.max_positions == 128
    assert json.dumps(manifest.to_json(), indent=2) + "\n" == text
    assert manifest.graph.files == tuple(f for f in manifest.files if f.endswith(".onnx"))


def test_version_1_without_a_graph_kind_holds_the_features_graph():
    manifest = read_manifest(FIXTURES / "v1-features")
    assert manifest.graph.kind == fmt.FEATURES_KIND and "kind" not in manifest.to_json()["graph"]


def _copy_with(tmp_path: Path, change) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(FIXTURES / "v2-features", folder)
    data = json.loads((folder / fmt.MANIFEST).read_text())
    change(data)
    (folder / fmt.MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    return folder


def test_a_bundle_of_a_future_version_is_refused_with_the_upgrade_to_make(tmp_path):
    folder = _copy_with(tmp_path, lambda m: m.update(format_version=99))
    with pytest.raises(mer.BundleError, match=r"format_version 99 is not supported: the bundle was written by a newer "
                                              r"mpt-edge.*reads versions 1, 2, 3; upgrade mpt-edge-runtime"):
        mer.load(folder, device="cpu")


@pytest.mark.parametrize("version", [0, "2", 2.5, True, None])
def test_a_version_that_was_never_written_is_refused(tmp_path, version):
    folder = _copy_with(tmp_path, lambda m: m.update(format_version=version))
    with pytest.raises(mer.BundleError, match=rf"format_version {version!r} is not supported \(this runtime reads 1, 2, 3\)"):
        mer.load(folder, device="cpu")


def test_a_bundle_without_format_version_is_refused(tmp_path):
    folder = _copy_with(tmp_path, lambda m: m.pop("format_version"))
    with pytest.raises(mer.BundleError, match=r"manifest.json has no format_version: it was not written by "
                                              r"`mpt-edge export` or is damaged; re-export"):
        mer.load(folder, device="cpu")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["prompt"].pop("length"), r"lacks prompt.length: the manifest is incomplete"),
    (lambda m: m["prompt"].update(hidden_size="32"), r"prompt.hidden_size must be an integer, got '32'"),
    (lambda m: m["graph"].update(file="other.onnx"), r"graph 'other.onnx' of kind 'features' is not one this runtime serves"),
    (lambda m: m["files"].pop(fmt.TOKENIZER), r"lists no tokenizer.json; the bundle is incomplete"),
    (lambda m: m.update(backbone=[]), r"'backbone' must be an object|backbone must be an object"),
    (lambda m: m["graph"].update(eos_token_ids=[1, "2"]), r"graph.eos_token_ids must be a list of integers"),
])
def test_a_malformed_manifest_is_one_clear_error_naming_the_file(tmp_path, change, message):
    folder = _copy_with(tmp_path, change)
    with pytest.raises(mer.BundleError, match=message) as err:
        mer.load(folder, device="cpu")
    assert str(folder / fmt.MANIFEST) in str(err.value)


def test_unknown_manifest_keys_are_kept(tmp_path):
    folder = _copy_with(tmp_path, lambda m: (m.update(note={"by": "hand"}), m["graph"].update(extra_flag=1)))
    text = (folder / fmt.MANIFEST).read_text()
    manifest = read_manifest(folder)
    assert manifest.extra == {"note": {"by": "hand"}} and manifest.graph.extra == {"extra_flag": 1}
    assert json.dumps(manifest.to_json(), indent=2) + "\n" == text
    assert file_sha256(folder / fmt.TOKENIZER) == manifest.files[fmt.TOKENIZER]

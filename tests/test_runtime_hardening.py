"""The runtime under garbage and load, property-based: any valid Unicode text (every category but surrogates;
empty, huge) is answered, and a lone surrogate, a non-string, an unknown task or a bad option is a documented
error, in single requests and mixed batches; a tampered bundle is refused file by file; the soak test (opt-in:
-m soak) reports latency and memory."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpt_edge_runtime as mer
from conftest import tiny_bert_backbone
from mpt_edge.bundle_source import backbone_facts
from mpt_edge_export.bundle_writer import BundleSource, ExportOptions, ExportTask, write_bundle
from mpt_edge_export.families import adapter_for
from mpt_edge_runtime import format as fmt
from test_export_runtime import _copy as copy_bundle, _rewrite_manifest as rewrite_manifest
from test_generation import bundle as decoder_bundle  # noqa: F401  (module fixture: causal bundle with generation)

DOCUMENTED = (mer.InputError, mer.UnknownTaskError)
UNICODE = st.characters(exclude_categories=["Cs"])          # every valid scalar value: all categories but surrogates
VALID_TEXTS = st.one_of(st.text(alphabet=UNICODE, max_size=300), st.sampled_from(["", " ", "\x00", "\ufeff", "\U0010ffff"]),
                        st.text(alphabet=UNICODE, min_size=1, max_size=3).map(lambda t: t * 20_000))
SURROGATE_TEXTS = st.tuples(st.text(alphabet=UNICODE, max_size=20), st.characters(categories=["Cs"]),
                            st.text(max_size=20)).map("".join)
NOT_TEXTS = st.one_of(st.binary(max_size=20), st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=3), max_size=2))
INVALID_TEXTS = st.one_of(SURROGATE_TEXTS, NOT_TEXTS)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def features_bundle(tmp_path_factory):
    """An encoder bundle (features graph) with two classify tasks."""
    backbone = tiny_bert_backbone()
    dim = 32
    generator = torch.Generator().manual_seed(0)
    tasks = [ExportTask({"name": name, "kind": "classify", "labels": labels, "verbalizers": labels, "template": template,
                         "group": 0, "max_length": 24},
                        np.ones((3, 1), np.float32), np.ones((1, dim), np.float32),
                        torch.randn(len(labels), dim, generator=generator).numpy(), np.zeros(len(labels), np.float32))
             for name, labels, template in (("polarity", ["negative", "positive"], "Review : {text} Sentiment :"),
                                            ("topic", ["sport", "science", "music"], "{text} Topic :"))]
    source = BundleSource("encoder", backbone_facts(backbone), backbone.model, adapter_for("encoder"), backbone.tokenizer,
                          [torch.randn(3, dim, generator=generator).numpy() * 0.1], tasks)
    out = tmp_path_factory.mktemp("features") / "bundle"
    write_bundle(source, out, ExportOptions(max_length=24))
    return out


FUSED_BUNDLE = os.path.join(os.path.dirname(__file__), "fixtures", "bundles", "v3-decoder-fused")


@pytest.fixture(scope="module")
def engines(features_bundle, decoder_bundle):
    return {"features": mer.load(features_bundle, "cpu"), "decoder": mer.load(decoder_bundle[1], "cpu"),
            "fused": mer.load(FUSED_BUNDLE, "cpu")}   # the fused generation graph (GroupQueryAttention)


def check_prediction(prediction, labels) -> None:
    probabilities = np.array(list(prediction.probabilities.values()))
    assert prediction.label in labels and np.isfinite(probabilities).all() and abs(probabilities.sum() - 1) < 1e-4


@FAST
@given(text=VALID_TEXTS)
def test_any_valid_unicode_text_is_classified(engines, text):
    for engine, task in ((engines["features"], "polarity"), (engines["decoder"], "mood"), (engines["fused"], "mood")):
        (prediction,) = engine.classify(task, [text])
        check_prediction(prediction, engine.task(task).labels)


@FAST
@given(text=INVALID_TEXTS)
def test_non_strings_and_lone_surrogates_are_input_errors(engines, text):
    for engine, task in ((engines["features"], "polarity"), (engines["decoder"], "mood"), (engines["fused"], "mood")):
        with pytest.raises(mer.InputError):
            engine.classify(task, [text])


VALID_ROWS = st.tuples(st.sampled_from(["polarity", "topic"]), VALID_TEXTS)
BAD_ROWS = st.one_of(st.tuples(st.sampled_from(["nope", "", None, 3]), VALID_TEXTS),
                     st.tuples(st.sampled_from(["polarity", "topic"]), INVALID_TEXTS))


@FAST
@given(requests=st.lists(VALID_ROWS, min_size=1, max_size=6))
def test_mixed_batches_of_valid_rows_answer_every_row(engines, requests):
    engine = engines["features"]
    predictions = engine.run(requests)
    assert len(predictions) == len(requests)
    for (task, _), prediction in zip(requests, predictions):
        assert prediction.task == task
        check_prediction(prediction, engine.task(task).labels)


@FAST
@given(requests=st.lists(VALID_ROWS, max_size=5), bad=BAD_ROWS, where=st.integers(0, 5))
def test_one_bad_row_makes_the_whole_batch_one_documented_error(engines, requests, bad, where):
    requests.insert(min(where, len(requests)), bad)
    with pytest.raises(DOCUMENTED):
        engines["features"].run(requests)


@FAST
@given(text=VALID_TEXTS, max_new_tokens=st.integers(1, 4), temperature=st.sampled_from([0.0, 0.7]))
def test_generation_answers_any_valid_unicode_text(engines, text, max_new_tokens, temperature):
    for engine in (engines["decoder"], engines["fused"]):
        (answer,) = engine.generate("echo", [text], max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
        assert isinstance(answer, str)


@FAST
@given(text=st.one_of(VALID_TEXTS, INVALID_TEXTS), max_new_tokens=st.integers(-2, 4),
       temperature=st.sampled_from([0.0, 0.7, -1.0, float("nan")]))
def test_generation_with_a_bad_text_or_option_is_an_input_error(engines, text, max_new_tokens, temperature):
    valid = isinstance(text, str) and not any("\ud800" <= c <= "\udfff" for c in text)
    if valid and max_new_tokens >= 1 and temperature >= 0:
        max_new_tokens = 0                                       # make one option bad
    for engine in (engines["decoder"], engines["fused"]):
        with pytest.raises(mer.InputError):
            engine.generate("echo", [text], max_new_tokens=max_new_tokens, temperature=temperature, seed=0)


def test_the_documented_messages(engines):
    engine = engines["features"]
    with pytest.raises(mer.InputError, match=r"lone surrogate '\\ud800' at character 2"):
        engine.classify("polarity", ["ab\ud800"])
    with pytest.raises(mer.InputError, match=r"got bytes \(decode bytes first"):
        engine.classify("polarity", [b"good"])
    with pytest.raises(mer.UnknownTaskError, match="unknown task 'nope'"):
        engine.run([("polarity", "fine"), ("nope", "fine")])
    (long,) = engine.classify("polarity", ["great " * 100_000])        # truncated to the task's max_length
    check_prediction(long, ("negative", "positive"))


def test_every_file_of_a_bundle_is_verified_before_use(features_bundle, tmp_path):
    manifest = json.loads((features_bundle / fmt.MANIFEST).read_text())
    assert set(manifest["files"]) >= {fmt.GRAPH, fmt.TOKENIZER, fmt.PROMPTS, fmt.TASKS}
    for name in manifest["files"]:
        folder = copy_bundle(features_bundle, tmp_path / name)
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / name).write_bytes(bytes(data))
        with pytest.raises(mer.BundleError, match=rf"{name} does not match its sha256"):
            mer.load(folder, "cpu")


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "sub/model.onnx", ".."])
def test_manifests_naming_files_outside_the_folder_are_refused(features_bundle, tmp_path, name):
    folder = copy_bundle(features_bundle, tmp_path)
    rewrite_manifest(folder, lambda manifest: manifest["files"].update({name: "0" * 64}))
    with pytest.raises(mer.BundleError, match="outside the bundle folder"):
        mer.load(folder, "cpu")


def test_a_symlinked_file_is_refused(features_bundle, tmp_path):
    folder = copy_bundle(features_bundle, tmp_path)
    outside = tmp_path / "tokenizer-elsewhere.json"
    shutil.move(folder / fmt.TOKENIZER, outside)
    os.symlink(outside, folder / fmt.TOKENIZER)
    with pytest.raises(mer.BundleError, match="is a symbolic link"):
        mer.load(folder, "cpu")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.soak
@pytest.mark.timeout(3600)   # opt-in load test: its length is set by SOAK_THREADS, SOAK_REQUESTS
def test_soak_threads_against_one_engine(engines, request):
    """N threads × M mixed classify/generate requests; zero errors; p99 latency and RSS, first vs last fifth."""
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("soak test: opt in with `pytest -m soak` (SOAK_THREADS, SOAK_REQUESTS set the load)")
    threads, per_thread = int(os.environ.get("SOAK_THREADS", 8)), int(os.environ.get("SOAK_REQUESTS", 300))
    engine = engines["decoder"]
    latencies, errors = [], []
    start_rss = rss_mb()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(per_thread):
            tick = time.perf_counter()
            try:
                if i % 2:
                    engine.generate("echo", ["the film was " + "good " * int(rng.integers(1, 8))], max_new_tokens=4)
                else:
                    engine.run([("mood", "bad plot " * int(rng.integers(1, 8))), ("mood", "fine")])
            except Exception as err:   # noqa: BLE001  (the soak counts every failure)
                errors.append(repr(err))
            latencies.append((time.perf_counter() - tick, time.perf_counter()))

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    began = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - began
    ordered = sorted(latencies, key=lambda x: x[1])
    fifth = max(1, len(ordered) // 5)
    p99 = lambda rows: 1e3 * float(np.percentile([r[0] for r in rows], 99))  # noqa: E731
    end_rss = rss_mb()
    print(f"\nsoak: {threads} threads × {per_thread} requests in {wall:.1f} s ({len(latencies) / wall:.0f} req/s); "
          f"errors {len(errors)}; p99 first fifth {p99(ordered[:fifth]):.1f} ms, last fifth {p99(ordered[-fifth:]):.1f} ms; "
          f"RSS start {start_rss:.0f} MB, end {end_rss:.0f} MB")
    assert not errors, errors[:3]
    assert end_rss < start_rss * 1.25 + 50    # flat: no growth beyond allocator noise

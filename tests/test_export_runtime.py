"""Train → export → torch-free runtime, on tiny Llama and BERT: same predictions as PyTorch."""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import synthetic_rows, synthetic_task
from mpt_edge import stages
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.bundle_source import bundle_source
from mpt_edge.prompt import PromptConfig
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import ExportError, ExportOptions, write_bundle, write_task_file
import mpt_edge_runtime as mer
from mpt_edge_runtime import format as fmt

CFG = TrainConfig(steps=4, batch_size=4, max_length=24, checkpoint_every=4, lr_prompt=0.3)


def trained_checkpoint(backbone, folder, names=("polarity", "topic"), rank=2):
    """Teachers → source → target (group mode) on synthetic tasks: a multi-task checkpoint with rank-r factors."""
    src = encode_tasks([synthetic_task(n, 16) for n in names], backbone.tokenizer, CFG.max_length)
    fit(stages.prompt_tuning("teachers", backbone, src, CFG, PromptConfig(length=3)), src, CFG, folder / "t",
        progress=False)
    fit(stages.source(backbone, src, load_trained(folder / "t"), CFG, rank=rank), src, CFG, folder / "s",
        progress=False)
    tgt = encode_tasks([synthetic_task(n, 16) for n in (*names, "mood")], backbone.tokenizer, CFG.max_length)
    fit(stages.target(backbone, tgt, load_trained(folder / "s"), CFG, mode="group"), tgt, CFG, folder / "m",
        progress=False)
    return load_trained(folder / "m")


@pytest.fixture
def exported(backbone, tmp_path):
    trained = trained_checkpoint(backbone, tmp_path)
    manifest = write_bundle(bundle_source(trained, backbone), tmp_path / "bundle", ExportOptions(max_length=24))
    return backbone, trained, tmp_path / "bundle", manifest


def torch_probabilities(backbone, trained, task, texts):
    """PyTorch reference: the training-side classifier with the checkpoint's prompts, one padded batch."""
    k = trained.index_of(task)
    spec = trained.specs[k]
    from mpt_edge.tasks import Example, TaskData

    data = TaskData(spec, [Example({"text": t}, 0) for t in texts])
    encoded = encode_tasks([data], backbone.tokenizer, CFG.max_length)
    batch = collate(encoded, [(0, i) for i in range(len(texts))])
    heads = trained.heads.select([k]) if trained.heads is not None else None
    clf = stages.classifier_for(backbone, [spec], heads)
    with torch.no_grad():
        logits, _ = clf(trained.prompt.fold()[k].expand(len(texts), -1, -1), batch)
    return torch.softmax(logits[:, : len(spec.labels)], dim=-1).numpy()


def texts_for(task, n=7):
    return [r["text"] for r in synthetic_rows(task, n, seed=5)]


def test_runtime_matches_pytorch_on_padded_batches(exported):
    backbone, trained, bundle, manifest = exported
    assert manifest["parity"]["fp32"]["max_rel_diff"] < 1e-3
    engine = mer.load(bundle, device="cpu")
    assert engine.tasks == sorted(["polarity", "topic", "mood"])
    for task in engine.tasks:
        texts = texts_for(task) + ["good"]  # lengths differ: padded rows
        expected = torch_probabilities(backbone, trained, task, texts)
        predictions = engine.classify(task, texts)
        got = np.array([[p.probabilities[label] for label in trained.specs[trained.index_of(task)].labels]
                        for p in predictions])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert [p.label for p in predictions] == [trained.specs[trained.index_of(task)].labels[i]
                                                  for i in expected.argmax(-1)]


def test_mixed_task_batch_equals_task_by_task(exported):
    _, _, bundle, _ = exported
    engine = mer.load(bundle, device="cpu")
    requests = [(task, text) for i, text in enumerate(texts_for("polarity", 6))
                for task in (["polarity", "topic", "mood"][i % 3],)]
    mixed = engine.run(requests)
    for (task, text), prediction in zip(requests, mixed):
        alone = engine.classify(task, [text])[0]
        assert prediction.task == task and prediction.label == alone.label
        assert prediction.probabilities == pytest.approx(alone.probabilities, abs=1e-5)


def test_concurrent_threads_agree_with_serial(exported):
    _, _, bundle, _ = exported
    engine = mer.load(bundle, device="cpu", threads=1)
    jobs = [(task, texts_for(task, 5)) for task in engine.tasks] * 3
    serial = [[p.probabilities for p in engine.classify(t, x)] for t, x in jobs]
    results = [None] * len(jobs)

    def work(i):
        results[i] = [p.probabilities for p in engine.classify(*jobs[i])]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == serial


def test_add_and_remove_task_without_reloading(exported, tmp_path):
    backbone, trained, bundle, _ = exported
    engine = mer.load(bundle, device="cpu")
    source = bundle_source(trained, backbone)
    mood = next(t for t in source.tasks if t.spec["name"] == "mood")
    write_task_file(tmp_path / "mood2.safetensors", mood)  # names the bundle's group 0
    engine.add_task("mood2", tmp_path / "mood2.safetensors")
    texts = texts_for("mood")
    assert [p.probabilities for p in engine.classify("mood2", texts)] == [p.probabilities for p in engine.classify("mood", texts)]
    write_task_file(tmp_path / "own.safetensors", mood, shared=source.groups[0] * 2)  # its own P*
    engine.add_task("mood-own", tmp_path / "own.safetensors")
    assert engine.classify("mood-own", texts)[0].probabilities != engine.classify("mood", texts)[0].probabilities
    engine.remove_task("mood2")
    assert "mood2" not in engine.tasks
    with pytest.raises(mer.UnknownTaskError, match="mood2"):
        engine.classify("mood2", texts)


def test_int8_bundle_loads_and_classifies(backbone, tmp_path):
    trained = trained_checkpoint(backbone, tmp_path, names=("polarity",), rank=1)
    manifest = write_bundle(bundle_source(trained, backbone), tmp_path / "b8", ExportOptions(quantize="int8", max_length=24))
    assert manifest["graph"]["quantize"]["matmuls"] > 0 and manifest["parity"]["quantized"]["min_cosine"] > 0.9
    engine = mer.load(tmp_path / "b8", device="cpu")
    predictions = engine.classify("polarity", texts_for("polarity"))
    assert len(predictions) == 7 and all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in predictions)


def test_fp16_bundle_loads_and_agrees_with_fp32(llama, tmp_path):
    trained = trained_checkpoint(llama, tmp_path, names=("polarity",), rank=1)
    manifest = write_bundle(bundle_source(trained, llama), tmp_path / "b16", ExportOptions(dtype="fp16", max_length=24))
    assert manifest["graph"]["dtype"] == "fp16" and manifest["parity"]["fp16"]["min_cosine"] > 0.999
    engine = mer.load(tmp_path / "b16", device="cpu")
    assert engine.model.float_type == np.float16
    expected = torch_probabilities(llama, trained, "polarity", texts_for("polarity"))
    got = [[p.probabilities[l] for l in ("negative", "positive")] for p in engine.classify("polarity", texts_for("polarity"))]
    np.testing.assert_allclose(np.array(got), expected, atol=2e-2)


def test_fp16_factors_halve_the_task_bytes_and_compose_as_stored(backbone, tmp_path):
    from safetensors.numpy import load_file

    trained = trained_checkpoint(backbone, tmp_path, names=("polarity",), rank=2)
    source = bundle_source(trained, backbone)
    write_bundle(source, tmp_path / "f32", ExportOptions(max_length=24))
    write_bundle(source, tmp_path / "f16", ExportOptions(max_length=24, factors_dtype="fp16"))
    full, half = (load_file(tmp_path / b / fmt.PROMPTS) for b in ("f32", "f16"))
    for task in ("polarity", "mood"):
        for part in ("u", "v"):
            key = fmt.task_key(task, part)
            assert full[key].dtype == np.float32 and half[key].dtype == np.float16
            assert half[key].nbytes * 2 == full[key].nbytes
    engine = mer.load(tmp_path / "f16", device="cpu")
    shared = half[fmt.shared_key(0)]
    for task in ("polarity", "mood"):   # the runtime composes from the rounded factors, in fp32
        u, v = (half[fmt.task_key(task, p)].astype(np.float32) for p in ("u", "v"))
        np.testing.assert_array_equal(engine.task(task).prompt, shared * (u @ v))
        expected = torch_probabilities(backbone, trained, task, texts_for(task))
        got = [[p.probabilities[label] for label in trained.specs[trained.index_of(task)].labels]
               for p in engine.classify(task, texts_for(task))]
        np.testing.assert_allclose(np.array(got), expected, atol=5e-3)   # fp16 rounding of U, V only
    with pytest.raises(ExportError, match="--factors-dtype 'int8' is not one of fp32, fp16"):
        ExportOptions(factors_dtype="int8")
    huge = replace(source, tasks=[replace(source.tasks[0], u=source.tasks[0].u * 1e6)])
    with pytest.raises(ExportError, match="beyond fp16's range .* export with --factors-dtype fp32"):
        write_bundle(huge, tmp_path / "huge", ExportOptions(max_length=24, factors_dtype="fp16"))
    assert not (tmp_path / "huge").exists()


def test_optimized_bundle_keeps_parity(llama, tmp_path):
    trained = trained_checkpoint(llama, tmp_path, names=("polarity",), rank=1)
    manifest = write_bundle(bundle_source(trained, llama), tmp_path / "opt", ExportOptions(optimize=True, max_length=24))
    assert manifest["parity"]["optimized"]["max_rel_diff"] < 1e-3
    expected = torch_probabilities(llama, trained, "polarity", texts_for("polarity"))
    got = [[p.probabilities[l] for l in ("negative", "positive")]
           for p in mer.load(tmp_path / "opt", device="cpu").classify("polarity", texts_for("polarity"))]
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4)


def test_existing_bundle_is_not_overwritten(exported):
    backbone, trained, bundle, _ = exported
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    with pytest.raises(ExportError, match="--overwrite"):
        write_bundle(bundle_source(trained, backbone), bundle, ExportOptions(max_length=24))
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]


# ---- bad bundles: each its own clear error ---------------------------------------------------------------

def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def _rewrite_manifest(folder, change):
    manifest = json.loads((folder / fmt.MANIFEST).read_text())
    change(manifest)
    (folder / fmt.MANIFEST).write_text(json.dumps(manifest))


def test_missing_file_is_named(exported, tmp_path):
    folder = _copy(exported[2], tmp_path)
    (folder / fmt.TOKENIZER).unlink()
    with pytest.raises(mer.BundleError, match=r"tokenizer.json is missing from the bundle"):
        mer.load(folder, device="cpu")


def test_changed_byte_fails_the_hash(exported, tmp_path):
    folder = _copy(exported[2], tmp_path)
    data = bytearray((folder / fmt.PROMPTS).read_bytes())
    data[-1] ^= 0x01
    (folder / fmt.PROMPTS).write_bytes(bytes(data))
    with pytest.raises(mer.BundleError, match=r"prompts.safetensors does not match its sha256"):
        mer.load(folder, device="cpu")


def test_unknown_format_version_is_refused(exported, tmp_path):
    folder = _copy(exported[2], tmp_path)
    _rewrite_manifest(folder, lambda m: m.update(format_version=99))
    with pytest.raises(mer.BundleError, match=r"format_version 99 is not supported"):
        mer.load(folder, device="cpu")


def test_prompt_length_or_hidden_size_that_does_not_fit(exported, tmp_path):
    folder = _copy(exported[2], tmp_path)
    _rewrite_manifest(folder, lambda m: m["prompt"].update(length=5))
    with pytest.raises(mer.BundleError, match=r"do not fit the graph's prompt \(5, 32\)"):
        mer.load(folder, device="cpu")
    folder2 = _copy(exported[2], tmp_path / "b")
    _rewrite_manifest(folder2, lambda m: m["prompt"].update(hidden_size=16))
    with pytest.raises(mer.BundleError, match=r"hidden size 16|\(3, 16\)"):
        mer.load(folder2, device="cpu")


def test_path_escaping_manifest_is_refused(exported, tmp_path):
    folder = _copy(exported[2], tmp_path)
    _rewrite_manifest(folder, lambda m: m["files"].update({"../secret": "0" * 64}))
    with pytest.raises(mer.BundleError, match=r"outside the bundle folder"):
        mer.load(folder, device="cpu")


def test_bad_requests_are_clear_errors(exported):
    engine = mer.load(exported[2], device="cpu")
    with pytest.raises(mer.UnknownTaskError, match=r"unknown task 'nope'; this engine serves: mood, polarity, topic"):
        engine.classify("nope", ["x"])
    with pytest.raises(mer.InputError, match="non-empty"):
        engine.classify("mood", [])
    with pytest.raises(mer.InputError, match="wrap one text in a list"):
        engine.classify("mood", "just a string")
    with pytest.raises(mer.InputError, match="must be a string"):
        engine.run([("mood", 3)])
    with pytest.raises(mer.DeviceError, match="not one of"):
        mer.load(exported[2], device="tpu")


def test_cuda_request_without_cuda_is_an_error_not_a_cpu_run(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal path cannot be shown here")
    with pytest.raises(mer.DeviceError, match=r"install `mpt-edge\[gpu\]`"):
        mer.load(exported[2], device="cuda")


def test_damaged_task_file_is_a_bundle_error(exported, tmp_path):
    engine = mer.load(exported[2], device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(mer.BundleError, match="is not an mpt-edge task file"):
        engine.add_task("junk", tmp_path / "junk.safetensors")
    with pytest.raises(mer.BundleError, match="does not exist"):
        engine.add_task("missing", tmp_path / "missing.safetensors")


def test_parity_failure_names_the_numbers_and_leaves_no_bundle(llama, tmp_path):
    from mpt_edge_export.parity import ParityError

    trained = trained_checkpoint(llama, tmp_path, names=("polarity",), rank=1)
    with pytest.raises(ParityError, match=r"differs from PyTorch by .* > tolerance 1e-12: batch 1 × 3: max abs diff") as err:
        write_bundle(bundle_source(trained, llama), tmp_path / "never", ExportOptions(tolerance=1e-12, max_length=24))
    assert len(err.value.report["cases"]) == 4
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


def test_engine_scores_equal_pytorch_scores(exported):
    from mpt_edge.evaluate import evaluate_engine, evaluate_trained

    backbone, trained, bundle, _ = exported
    test = synthetic_task("topic", 30, seed=7)
    scores, predictions = evaluate_engine(mer.load(bundle, device="cpu"), test)
    expected = evaluate_trained(backbone, trained, [test], max_length=CFG.max_length)["topic"]
    assert len(predictions) == 30 and scores == pytest.approx(expected)

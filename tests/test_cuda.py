"""The runtime on CUDA: what CPU tests cannot show. The CUDA provider really runs each graph kind, I/O binding
(inputs bound from the host, outputs bound on the device, the fused decoder's KV copied back each step) gives the
CPU's answers, and an fp16 bundle on the GPU predicts like the fp32 one. Every test is marked `cuda` and skips,
with the reason, where onnxruntime has no CUDA provider (`pip install "mpt-edge[gpu]"` on an NVIDIA machine):

    pytest -m cuda            # bench/gpu_check.sh runs these and the CUDA benchmarks in one go
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import mpt_edge_runtime as mer
from conftest import synthetic_task, tiny_llama_backbone
from mpt_edge import stages
from mpt_edge.batching import encode_tasks
from mpt_edge.bundle_source import bundle_source
from mpt_edge.prompt import PromptConfig
from mpt_edge.trained import load_trained
from mpt_edge.training_loop import fit
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle
from mpt_edge_runtime.session import CUDA
from test_precision import CFG, TASKS, limits, probabilities

FIXTURES = Path(__file__).parent / "fixtures" / "bundles"
BUNDLES = ("v1-features", "v2-features", "v2-decoder", "v3-decoder-fused")
TEXTS = ["the film was good", "awful", "a very dull story and it was bad", "", "goal team ball", "star cell"]

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    CUDA not in ort.get_available_providers(),
    reason=f"onnxruntime {ort.__version__} has no CUDA provider here (providers: {', '.join(ort.get_available_providers())}); "
           'run on an NVIDIA machine with pip install "mpt-edge[gpu]"')]


def providers(engine) -> list[str]:
    return engine.model.runner.graph.session.get_providers()


@pytest.mark.parametrize("name", BUNDLES)
def test_every_graph_kind_runs_on_the_cuda_provider_and_answers_as_on_cpu(name):
    cpu, gpu = mer.load(FIXTURES / name, device="cpu", threads=1), mer.load(FIXTURES / name, device="cuda")
    assert gpu.device == "cuda" and providers(gpu)[0] == CUDA
    for task in cpu.tasks:
        if cpu.task(task).kind == "classify":
            want, got = cpu.classify(task, TEXTS), gpu.classify(task, TEXTS)
            assert [p.label for p in got] == [p.label for p in want]
            for a, b in zip(want, got):
                assert list(b.probabilities.values()) == pytest.approx(list(a.probabilities.values()), abs=1e-4)
        else:   # greedy decoding: every step's logits come back through I/O binding (fused: the KV copy path too)
            params = mer.SamplingParams(max_new_tokens=6)
            assert gpu.generate(task, TEXTS, params) == cpu.generate(task, TEXTS, params)
            assert "".join(gpu.stream(task, TEXTS[0], params)) == cpu.generate(task, TEXTS[:1], params)[0]


def test_mixed_task_batches_on_cuda_equal_single_task_calls():
    engine = mer.load(FIXTURES / "v2-features", device="cuda")
    tasks = engine.tasks
    assert len(tasks) == 2 and all(engine.task(t).kind == "classify" for t in tasks)
    requests = [(tasks[i % len(tasks)], text) for i, text in enumerate(TEXTS)]
    mixed = engine.run(requests)
    alone = [engine.classify(task, [text])[0] for task, text in requests]
    for a, b in zip(alone, mixed):
        assert a.label == b.label
        assert list(b.probabilities.values()) == pytest.approx(list(a.probabilities.values()), abs=1e-4)


def test_an_fp16_bundle_on_cuda_predicts_like_the_fp32_bundle(tmp_path):
    """fp16 weights and activations on the GPU against the fp32 graph on the CPU, with test_precision's fp16 limits."""
    backbone = tiny_llama_backbone()
    encoded = encode_tasks([synthetic_task(name, 32) for name in TASKS], backbone.tokenizer, CFG.max_length)
    fit(stages.prompt_tuning("pt", backbone, encoded, CFG, PromptConfig(length=4)), encoded, CFG, tmp_path / "pt",
        progress=False)
    source = bundle_source(load_trained(tmp_path / "pt"), backbone)
    for dtype in ("fp32", "fp16"):
        write_bundle(source, tmp_path / dtype, ExportOptions(max_length=CFG.max_length, dtype=dtype, fuse=False))
    reference = probabilities(mer.load(tmp_path / "fp32", device="cpu", threads=1))
    engine = mer.load(tmp_path / "fp16", device="cuda")
    assert providers(engine)[0] == CUDA and engine.model.float_type == np.float16
    got = probabilities(engine)
    agree = np.concatenate([reference[t].argmax(-1) == got[t].argmax(-1) for t in TASKS])
    error = np.concatenate([np.abs(reference[t] - got[t]).max(-1) for t in TASKS])
    min_agreement, max_error, mean_error = limits("fp16")
    assert agree.mean() >= min_agreement and error.max() <= max_error and error.mean() <= mean_error, \
        f"fp16 on CUDA: agreement {agree.mean():.3f}, max |Δp| {error.max():.4f}, mean {error.mean():.4f}"

"""Real backbones, real data: a short prompt-tuning run → exported bundle → torch-free runtime, against PyTorch.

Opt-in (`pytest -m real`, add `-s` to see the measured differences and times). Every test skips with the reason
when its backbone (`<cache>/backbones/<name>`) or task data (`<cache>/data/<task>`) is not in the package cache:
nothing here downloads.

- SmolLM2-135M (causal, verbalizer scoring) and MiniLM-L6 (encoder, with its trained head), each prompt-tuned for a
  few steps on real rotten_tomatoes training rows, exported with the features graph: on 16 real test reviews the
  runtime's class probabilities are within 1e-4 (absolute, the project's fp32 standard) of PyTorch's and the labels
  are the same.
- SmolLM2 also exported with the KV-cache generation graph (`ExportOptions(kv_cache=True)`, a classify and a generate
  task): classification through the cached prompt meets the same 1e-4, and greedy generation of 16 new tokens on 3
  real StrategyQA questions (one padded batch) equals PyTorch's greedy decoding without a cache token for token, with
  the logits of every step within 1e-4 · max(max |logit|, 1) of PyTorch's.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from mpt_edge import stages
from mpt_edge.backbones import NAMED_BACKBONES, load_backbone
from mpt_edge.batching import collate, encode_tasks, eos_id
from mpt_edge.bundle_source import bundle_source
from mpt_edge.data.fetch import default_data_dir
from mpt_edge.datasets import load_split
from mpt_edge.packages import cache_dir
from mpt_edge.prompt import PromptConfig
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import load_trained
from mpt_edge_export.bundle_writer import ExportOptions, write_bundle
import mpt_edge_runtime as mer
from test_generation_logits import StepRecorder, pytorch_step_logits

pytestmark = [pytest.mark.real, pytest.mark.timeout(1800)]

CFG = TrainConfig(steps=4, batch_size=4, max_length=64, checkpoint_every=4, lr_prompt=0.3, seed=0)
PROMPT_LENGTH = 20
PROB_ATOL = 1e-4        # class probabilities, absolute (fp32)
LOGIT_RTOL = 1e-4       # generation logits: |runtime − torch| ≤ LOGIT_RTOL · max(max |torch logit| of the step, 1)
N_TEXTS = 16
NEW_TOKENS = 16
CLASSIFY, GENERATE = "rotten_tomatoes", "strategyqa_explain"


# -- skips: opt-in, and only what the cache already holds -------------------------------------------------------

def _require(request, backbone: str, tasks: dict[str, tuple[str, ...]]) -> None:
    if "real" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real backbone and data: opt in with `pytest -m real`")
    folder = cache_dir() / "backbones" / NAMED_BACKBONES[backbone].name
    if not (folder / "config.json").is_file():
        pytest.skip(f"backbone {backbone} is not in the cache ({folder}); this test does not download: "
                    f"load it once with mpt_edge.backbones.load_backbone({backbone!r})")
    for task, splits in tasks.items():
        data = default_data_dir() / task
        missing = [f for f in ("task.json", *(f"{s}.jsonl" for s in splits)) if not (data / f).is_file()]
        if missing:
            pytest.skip(f"task {task} is not in the cache ({data} lacks {', '.join(missing)}); this test does not "
                        f"download: `mpt-edge data fetch {task}`")


def _timed(label: str, times: dict, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    times[label] = time.perf_counter() - start
    return result


def _train(backbone, tasks: list[str], folder, times: dict):
    """A short vanilla-PT run (CFG.steps per task, prompt length 20) on 32 real training rows of each task."""
    data = load_split(tasks, default_data_dir(), "train", limit=32, seed=0)
    encoded = encode_tasks(data, backbone.tokenizer, CFG.max_length, eos_id(backbone.model))
    plan = stages.prompt_tuning("teachers", backbone, encoded, CFG, PromptConfig(length=PROMPT_LENGTH))
    _timed("train", times, fit, plan, encoded, CFG, folder, progress=False)
    return load_trained(folder)


def _only_classify(source):
    """The bundle source restricted to its classify tasks (the features graph serves no generate task), each
    task's shared prompt renumbered."""
    kept = [t for t in source.tasks if t.spec["kind"] == "classify"]
    groups = [source.groups[t.spec["group"]] for t in kept]
    tasks = [dataclasses.replace(t, spec={**t.spec, "group": i}) for i, t in enumerate(kept)]
    return dataclasses.replace(source, groups=groups, tasks=tasks)


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory):
    _require(request, "smollm2-135m", {CLASSIFY: ("train", "test"), GENERATE: ("train", "test")})
    times = {}
    backbone = _timed("load", times, load_backbone, "smollm2-135m")
    folder = tmp_path_factory.mktemp("smollm2")
    trained = _train(backbone, [CLASSIFY, GENERATE], folder / "run", times)
    return backbone, trained, folder, times


@pytest.fixture(scope="module")
def minilm(request, tmp_path_factory):
    _require(request, "minilm-l6", {CLASSIFY: ("train", "test")})
    times = {}
    backbone = _timed("load", times, load_backbone, "minilm-l6")
    folder = tmp_path_factory.mktemp("minilm")
    trained = _train(backbone, [CLASSIFY], folder / "run", times)
    return backbone, trained, folder, times


@pytest.fixture(scope="module")
def smollm2_kv_bundle(smollm2):
    backbone, trained, folder, times = smollm2
    _timed("export kv", times, write_bundle, bundle_source(trained, backbone), folder / "kv",
           ExportOptions(max_length=CFG.max_length, kv_cache=True))
    return folder / "kv"


# -- references ----------------------------------------------------------------------------------------------

def real_texts(task: str = CLASSIFY, n: int = N_TEXTS) -> list[str]:
    return [ex.fields["text"] for ex in load_split([task], default_data_dir(), "test", limit=n, seed=0)[0].examples]


def torch_probabilities(backbone, trained, task: str, texts: list[str]) -> np.ndarray:
    """PyTorch: the training-side classifier with the checkpoint's composed prompt, one right-padded batch."""
    from mpt_edge.tasks import Example, TaskData

    k = trained.index_of(task)
    spec = trained.specs[k]
    encoded = encode_tasks([TaskData(spec, [Example({"text": t}, 0) for t in texts])], backbone.tokenizer,
                           trained.meta.max_length)
    batch = collate(encoded, [(0, i) for i in range(len(texts))])
    heads = trained.heads.select([k]) if trained.heads is not None else None
    clf = stages.classifier_for(backbone, [spec], heads, trained.meta.pooling_or_default)
    with torch.no_grad():
        logits, _ = clf(trained.prompt.fold()[k].expand(len(texts), -1, -1), batch)
    return torch.softmax(logits[:, : len(spec.labels)], dim=-1).numpy()


def check_classify(name: str, backbone, trained, bundle, times: dict) -> None:
    engine = mer.load(bundle, device="cpu")
    labels = list(trained.specs[trained.index_of(CLASSIFY)].labels)
    texts = real_texts()
    start = time.perf_counter()
    predictions = engine.classify(CLASSIFY, texts)
    runtime_s = time.perf_counter() - start
    got = np.array([[p.probabilities[label] for label in labels] for p in predictions])
    start = time.perf_counter()
    expected = torch_probabilities(backbone, trained, CLASSIFY, texts)
    torch_s = time.perf_counter() - start
    diff = np.abs(got - expected).max()
    gold = [ex.label for ex in load_split([CLASSIFY], default_data_dir(), "test", limit=N_TEXTS, seed=0)[0].examples]
    accuracy = np.mean(expected.argmax(-1) == np.array(gold))
    print(f"\n[{name}] {len(texts)} real {CLASSIFY} test texts: max |p_runtime − p_torch| = {diff:.2e} "
          f"(tolerance {PROB_ATOL:.0e}); torch accuracy {accuracy:.2f} after {trained.meta.step} steps; "
          f"runtime {runtime_s:.2f} s, torch {torch_s:.2f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    np.testing.assert_allclose(got, expected, atol=PROB_ATOL, rtol=0, err_msg=name)
    assert [p.label for p in predictions] == [labels[i] for i in expected.argmax(-1)]


# -- classification ------------------------------------------------------------------------------------------

def test_smollm2_classify_features_graph_equals_pytorch(smollm2):
    backbone, trained, folder, times = smollm2
    _timed("export", times, write_bundle, _only_classify(bundle_source(trained, backbone)), folder / "features",
           ExportOptions(max_length=CFG.max_length))
    check_classify("smollm2-135m features graph", backbone, trained, folder / "features", times)


def test_smollm2_classify_kv_graph_equals_pytorch(smollm2, smollm2_kv_bundle):
    backbone, trained, _, times = smollm2
    check_classify("smollm2-135m kv-cache graph", backbone, trained, smollm2_kv_bundle, times)


def test_minilm_classify_with_head_equals_pytorch(minilm):
    backbone, trained, folder, times = minilm
    assert trained.heads is not None
    _timed("export", times, write_bundle, bundle_source(trained, backbone), folder / "features",
           ExportOptions(max_length=CFG.max_length))
    check_classify("minilm-l6 features graph", backbone, trained, folder / "features", times)


# -- generation ----------------------------------------------------------------------------------------------

def test_smollm2_greedy_generation_equals_pytorch_token_for_token_and_by_logits(smollm2, smollm2_kv_bundle):
    """3 real questions in one padded batch, 16 greedy tokens: the runtime (KV cache, prompt KV computed once)
    against PyTorch recomputing [prompt | input | generated] from scratch at every step, with the checkpoint's own
    composed prompt (not the bundle's)."""
    backbone, trained, _, times = smollm2
    engine = mer.load(smollm2_kv_bundle, device="cpu")
    engine.model = dataclasses.replace(engine.model, runner=(recorder := StepRecorder(engine.model.runner)))
    questions = real_texts(GENERATE, 3)
    start = time.perf_counter()
    answers = engine.generate(GENERATE, questions, max_new_tokens=NEW_TOKENS)
    runtime_s = time.perf_counter() - start

    eos = list(engine.manifest.graph.eos_token_ids)
    logits = np.stack(recorder.logits, axis=1)                                   # (rows, steps, V)
    steps = logits.shape[1]
    greedy = logits.argmax(-1)                                                   # the runtime's greedy choices
    fed = np.stack(recorder.fed, axis=1) if recorder.fed else np.zeros((len(questions), 0), np.int64)
    prompt = trained.prompt.fold()[trained.index_of(GENERATE)].numpy()
    start = time.perf_counter()
    worst_rel, worst_abs, min_margin, produced = 0.0, 0.0, np.inf, []
    for row, (question, (_, ids)) in enumerate(zip(questions, recorder.rows)):
        ended = np.flatnonzero(np.isin(greedy[row], eos))
        n = ended[0] + 1 if len(ended) else steps                                # tokens up to the first eos
        assert np.array_equal(fed[row, : n - 1], greedy[row, : n - 1])           # it fed back its argmax
        expected = pytorch_step_logits(backbone.model, "causal", prompt, list(ids), fed[row, : n - 1].tolist())
        scale = np.maximum(np.abs(expected).max(-1, keepdims=True), 1.0)
        rel = np.abs(logits[row, :n] - expected) / scale
        worst_rel = max(worst_rel, float(rel.max()))
        worst_abs = max(worst_abs, float(np.abs(logits[row, :n] - expected).max()))
        top2 = np.sort(expected, -1)[:, -2:]
        min_margin = min(min_margin, float((top2[:, 1] - top2[:, 0]).min()))
        # greedy without a cache: PyTorch's argmax at each step, from its own logits, is the token the runtime chose
        torch_tokens = expected.argmax(-1)
        assert torch_tokens.tolist() == greedy[row, :n].tolist(), f"row {row}: {question!r}"
        assert rel.max() <= LOGIT_RTOL, f"row {row}: max relative logit difference {rel.max():.2e}"
        text = backbone.tokenizer.decode([t for t in torch_tokens.tolist() if t not in eos])
        assert answers[row] == text, f"row {row}"
        produced.append(n)
    torch_s = time.perf_counter() - start
    print(f"\n[smollm2-135m generation] {len(questions)} real {GENERATE} questions, {produced} greedy tokens "
          f"(max {NEW_TOKENS}): token for token equal to PyTorch; step logits max |diff| {worst_abs:.2e}, "
          f"max |diff| / max(|logit|, 1) {worst_rel:.2e} (tolerance {LOGIT_RTOL:.0e}); smallest top-2 logit margin "
          f"{min_margin:.3f}; runtime {runtime_s:.2f} s, torch (no cache) {torch_s:.2f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    for question, answer in zip(questions, answers):
        print(f"  Q: {question[:70]!r} → {answer!r}")

"""`SamplingParams`: the one object that says how to generate, with the engine's keyword options as overrides.
On the stored format-2 generation fixture (no torch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import mpt_edge_runtime as mer
from mpt_edge_runtime.sampling import SAMPLING_FIELDS, sampling_params

FIXTURES = Path(__file__).parent / "fixtures" / "bundles"
TEXTS = ["the film was good", "awful"]


@pytest.fixture(scope="module")
def engine():
    return mer.load(FIXTURES / "v2-decoder", device="cpu", threads=1)


def test_defaults_are_greedy_32_tokens_and_the_object_is_frozen():
    params = mer.SamplingParams()
    assert dataclasses.astuple(params) == (32, 0.0, 0, 1.0, None, ())
    assert SAMPLING_FIELDS == ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 1.0
    assert mer.SamplingParams(stop="\n").stop == ("\n",) and mer.SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(mer.SamplingParams(stop=["a"])) == hash(mer.SamplingParams(stop=("a",)))


def test_keywords_override_the_object_and_are_checked_the_same_way():
    base = mer.SamplingParams(max_new_tokens=4, temperature=0.5, seed=1)
    assert sampling_params(base, {"seed": 2}) == dataclasses.replace(base, seed=2)
    assert sampling_params(None, {"top_k": 3}) == mer.SamplingParams(top_k=3)
    assert sampling_params(base, {}) is base
    with pytest.raises(mer.InputError, match="top_p must be in"):
        sampling_params(base, {"top_p": 0})


def test_the_object_and_the_keywords_give_the_same_text(engine):
    params = mer.SamplingParams(max_new_tokens=5, temperature=0.9, top_k=5, seed=4)
    by_object = engine.generate("echo", TEXTS, params)
    assert engine.generate("echo", TEXTS, max_new_tokens=5, temperature=0.9, top_k=5, seed=4) == by_object
    assert engine.generate_batch([("echo", t) for t in TEXTS], params) == by_object
    assert "".join(engine.stream("echo", TEXTS[0], params)) == engine.generate("echo", TEXTS[:1], params)[0]
    pieces = [""] * len(TEXTS)
    for i, piece in engine.stream_batch([("echo", t) for t in TEXTS], params):
        pieces[i] += piece
    assert pieces == by_object
    assert engine.generate("echo", TEXTS, mer.SamplingParams(max_new_tokens=9), max_new_tokens=5) == \
        engine.generate("echo", TEXTS, mer.SamplingParams(max_new_tokens=5))


def test_a_wrong_sampling_argument_is_a_clear_error(engine):
    with pytest.raises(mer.InputError, match=r"sampling must be a SamplingParams or None, got int 8; .*max_new_tokens=8"):
        engine.generate("echo", TEXTS, 8)
    with pytest.raises(TypeError, match="unexpected keyword argument.*topk; sampling options are max_new_tokens"):
        engine.generate("echo", TEXTS, topk=3)
    with pytest.raises(mer.InputError, match="max_new_tokens must be an integer >= 1"):
        engine.generate("echo", TEXTS, max_new_tokens=0)


def test_generation_on_a_bundle_without_a_generation_graph_is_refused():
    engine = mer.load(FIXTURES / "v2-features", device="cpu", threads=1)
    with pytest.raises(mer.BundleError, match="no generation graph"):
        engine.generate_batch([("polarity", "good")], mer.SamplingParams())

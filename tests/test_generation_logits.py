"""Generation judged by value: the runtime's logits at every decoding step against PyTorch recomputing the whole
sequence without a cache, on the tiny causal backbone with its prompt prefix and on a tiny T5, greedy and sampled,
in a padded batch that mixes tasks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import mpt_edge_runtime as mer
from test_generation import bundle as causal_generation_bundle  # noqa: F401  (module fixture)
from test_seq2seq_generation import bundle as seq2seq_generation_bundle  # noqa: F401  (module fixture)


class StepRecorder:
    """Stands in for an engine's generation session: passes every call through and keeps what decoding saw:
    the rows it started from, the logits of each step and the tokens fed back."""

    def __init__(self, steps):
        self.steps, self.rows, self.logits, self.fed = steps, None, [], []

    @property
    def graph(self):
        return self.steps.graph

    def prefix(self, prompt):
        return self.steps.prefix(prompt)

    def start(self, rows):
        logits, features, state = self.steps.start(rows)
        self.rows, self.logits, self.fed = rows, [logits], []
        return logits, features, state

    def advance(self, state, tokens):
        logits, state = self.steps.advance(state, tokens)
        self.logits.append(logits)
        self.fed.append(np.array(tokens))
        return logits, state

    def select(self, state, index):
        return self.steps.select(state, index)


@torch.no_grad()
def pytorch_step_logits(model, family: str, prompt: np.ndarray, ids: list[int], fed: list[int]) -> np.ndarray:
    """Without a cache: the logits after [prompt | input] and after each fed token, recomputed from scratch."""
    prompt = torch.from_numpy(prompt)[None]
    embed = model.get_input_embeddings()
    out = []
    for j in range(len(fed) + 1):
        if family == "causal":
            embeds = torch.cat([prompt, embed(torch.tensor([ids + fed[:j]]))], dim=1)
            out.append(model(inputs_embeds=embeds).logits[0, -1])
        else:
            embeds = torch.cat([prompt, embed(torch.tensor([ids]))], dim=1)
            decoder_ids = torch.tensor([[model.config.decoder_start_token_id] + fed[:j]])
            out.append(model(inputs_embeds=embeds, decoder_input_ids=decoder_ids).logits[0, -1])
    return torch.stack(out).numpy()


REQUESTS = [("echo", "the film was really good"), ("chat", "bad"),
            ("echo", "a story and it is quite dull and the plot")]


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.5, "top_k": 8, "seed": 3}], ids=["greedy", "sampled"])
def test_generation_logits_equal_pytorch_at_every_step(family, sampling, request):
    """A padded batch of mixed tasks, 8 steps: each row's logits at each step within 1e-4 of PyTorch's (and so its
    log-probabilities within 2e-4), and greedy decoding feeds back the argmax of exactly those logits."""
    backbone, out, _ = request.getfixturevalue(f"{family}_generation_bundle")
    engine = mer.load(out, "cpu")
    engine.model = replace(engine.model, runner=(recorder := StepRecorder(engine.model.runner)))
    engine.generate_batch(REQUESTS, max_new_tokens=8, **sampling)
    logits = np.stack(recorder.logits, axis=1)                                   # (rows, steps, V)
    fed = np.stack(recorder.fed, axis=1) if recorder.fed else np.zeros((len(REQUESTS), 0), np.int64)
    assert logits.shape[:2] == (len(REQUESTS), 8)
    if not sampling:   # greedy feeds back each step's argmax; a row that produced an end-of-sequence token keeps it
        eos = list(engine.manifest.graph.eos_token_ids)
        expected_fed = logits[:, :-1].argmax(-1)
        for row in expected_fed:
            ended = np.flatnonzero(np.isin(row, eos))
            if len(ended):
                row[ended[0] + 1:] = eos[0]
        assert np.array_equal(fed, expected_fed)
    for row, ((task, _), (_, ids)) in enumerate(zip(REQUESTS, recorder.rows)):
        expected = pytorch_step_logits(backbone.model, family, engine.task(task).prompt, list(ids), fed[row].tolist())
        np.testing.assert_allclose(logits[row], expected, atol=1e-4, rtol=0, err_msg=f"row {row} ({task})")
        log_probs = torch.log_softmax(torch.from_numpy(logits[row]), -1).numpy()
        np.testing.assert_allclose(log_probs, torch.log_softmax(torch.from_numpy(expected), -1).numpy(), atol=2e-4)

"""Batched generation on the KV-cache graphs: causal (`decoder.onnx`) and seq2seq (`encoder.onnx` + `decoder.onnx`).

    prefix = steps.prefix(prompt)                              # once per task (causal: the prompt's KV)
    for tokens in decode(steps, [(prefix, ids), ...], config, eos_ids):   # one (B,) array per step
        ...

Both sessions offer the same calls, so decoding and label scoring are written once:
`prefix(prompt)`, `start(rows) → (logits, features, state)`, `advance(state, tokens) → (logits, state)`,
`select(state, index) → state` (rows picked or repeated), and `features(rows) → (B, d)` (classification).

Causal rows are left-padded behind the prompt KV: [prompt KV | pad | tokens], with positions that skip the
padding, so a row's tokens see exactly what they would see alone. Seq2seq rows run the encoder over
[prompt | input] (right-padded), once per request; the cross-attention KV it returns is reused by every
decode step. Rows of different tasks mix freely: all prompts have the same length l.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.sampling import SamplingParams, next_tokens
from mpt_edge_runtime.session import GraphSession

Cache = tuple[np.ndarray, ...]   # past.0.key, past.0.value, past.1.key, ...; each (h_kv, S, d_h) for one row


@dataclass(frozen=True)
class DecoderSession:
    """The generation graph of a causal bundle: one prefill or decode step with a KV cache."""

    graph: GraphSession
    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def open(cls, graph: GraphSession, hidden_size: int) -> "DecoderSession":
        return cls(graph, *cache_layout(graph), hidden_size)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, prompts: np.ndarray,
             past: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One graph call → logits (B, V), features (B, d), present (2·layers × (B, h_kv, K, d_h))."""
        feeds = {fmt.INPUT_IDS: input_ids, fmt.ATTENTION_MASK: attention_mask, fmt.POSITION_IDS: position_ids,
                 fmt.PROMPT_EMBEDS: prompts, **dict(zip(fmt.cache_names("past", self.layers), past))}
        outputs = [fmt.LOGITS, fmt.FEATURES, *fmt.cache_names("present", self.layers)]
        logits, features, *present = self.graph.run(outputs, feeds)
        return logits, features, present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def prefix(self, prompt: np.ndarray) -> Cache:
        return prompt_cache(self, prompt)

    def start(self, rows: Sequence[tuple[Cache, Sequence[int]]]):
        logits, features, present, mask, positions = prefill(self, rows)
        return logits, features, (present, mask, positions)

    def features(self, rows: Sequence[tuple[Cache, Sequence[int]]]) -> np.ndarray:
        """The last input token's hidden state of each row, (B, d): what classification reads."""
        return self.start(rows)[1]

    def advance(self, state, tokens: np.ndarray):
        past, mask, positions = state
        mask = np.concatenate([mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        positions = positions + 1
        prompts = np.zeros((len(tokens), 0, self.hidden_size), np.float32)
        logits, _, past = self.step(tokens[:, None], mask, positions[:, None], prompts, past)
        return logits, (past, mask, positions)

    def select(self, state, index: np.ndarray):
        past, mask, positions = state
        return [p[index] for p in past], mask[index], positions[index]


@dataclass(frozen=True)
class Seq2SeqSession:
    """The generation graphs of a seq2seq bundle: encoder + decoder step 0 (`prefill`), then one step at a time."""

    prefill: GraphSession
    graph_step: GraphSession
    layers: int

    @property
    def graph(self) -> GraphSession:
        return self.prefill

    @classmethod
    def open(cls, prefill: GraphSession, step: GraphSession) -> "Seq2SeqSession":
        layers = sum(1 for i in step.session.get_inputs() if i.name.startswith("past.")) // 2
        return cls(prefill, step, layers)

    def prefix(self, prompt: np.ndarray) -> np.ndarray:
        return prompt   # the encoder is bidirectional: the prompt's states depend on the input, nothing to cache

    def start(self, rows: Sequence[tuple[np.ndarray, Sequence[int]]]):
        ids, mask = right_padded([row_ids for _, row_ids in rows])
        prompts = np.stack([prompt for prompt, _ in rows]).astype(np.float32)
        outputs = [fmt.LOGITS, fmt.FEATURES, *fmt.cache_names("present", self.layers), *fmt.cache_names("cross", self.layers)]
        logits, features, *kv = self.prefill.run(outputs, {fmt.INPUT_IDS: ids, fmt.ATTENTION_MASK: mask,
                                                           fmt.PROMPT_EMBEDS: prompts})
        encoder_mask = np.concatenate([np.ones((len(rows), prompts.shape[1]), np.int64), mask], axis=1)
        return logits, features, (kv[:2 * self.layers], kv[2 * self.layers:], encoder_mask)

    def features(self, rows: Sequence[tuple[np.ndarray, Sequence[int]]]) -> np.ndarray:
        """Decoder step 0's hidden state of each row, (B, d): what classification reads."""
        return self.start(rows)[1]

    def advance(self, state, tokens: np.ndarray):
        past, cross, encoder_mask = state
        feeds = {fmt.INPUT_IDS: tokens[:, None].astype(np.int64), fmt.ENCODER_ATTENTION_MASK: encoder_mask,
                 **dict(zip(fmt.cache_names("past", self.layers), past)), **dict(zip(fmt.cache_names("cross", self.layers), cross))}
        logits, _, *present = self.graph_step.run([fmt.LOGITS, fmt.FEATURES, *fmt.cache_names("present", self.layers)], feeds)
        return logits, (present, cross, encoder_mask)

    def select(self, state, index: np.ndarray):
        past, cross, encoder_mask = state
        return [p[index] for p in past], [c[index] for c in cross], encoder_mask[index]


def cache_layout(graph: GraphSession) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a causal step graph, read from its past.<i>.key / .value inputs."""
    shapes = {i.name: i.shape for i in graph.session.get_inputs()}
    layers = sum(1 for name in shapes if name.startswith("past.")) // 2
    _, kv_heads, _, head_dim = shapes[fmt.past_name(0, "key")]
    return layers, int(kv_heads), int(head_dim)


def right_padded(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows → ids (B, n) padded with 0 on the right and the mask of the real tokens (B, n), int64."""
    width = max(len(row) for row in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    return ids, mask


def prompt_cache(decoder: DecoderSession, prompt: np.ndarray) -> Cache:
    """A task's prompt (l, d) → its KV (one (h_kv, l, d_h) array per layer and part), computed once."""
    length = prompt.shape[0]
    _, _, present = decoder.step(np.zeros((1, 0), np.int64), np.ones((1, length), np.int64),
                                 np.arange(length, dtype=np.int64)[None], prompt[None], decoder.empty_past(1))
    return tuple(p[0] for p in present)


def prefill_inputs(rows: Sequence[tuple[Cache, Sequence[int]]], hidden_size: int) -> dict[str, np.ndarray]:
    """Left-padded ids, the mask over [prompt KV | pad | tokens], positions that skip padding, stacked past."""
    prefix = rows[0][0][0].shape[1]
    width = max(len(ids) for _, ids in rows)
    ids = np.zeros((len(rows), width), np.int64)
    real = np.zeros((len(rows), width), np.int64)
    for b, (_, row_ids) in enumerate(rows):
        ids[b, width - len(row_ids):], real[b, width - len(row_ids):] = row_ids, 1
    mask = np.concatenate([np.ones((len(rows), prefix), np.int64), real], axis=1)
    positions = np.maximum(prefix + real.cumsum(axis=1) - 1, prefix)
    past = [np.stack([cache[k] for cache, _ in rows]) for k in range(len(rows[0][0]))]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
            "prompts": np.zeros((len(rows), 0, hidden_size), np.float32), "past": past}


def prefill(decoder: DecoderSession, rows: Sequence[tuple[Cache, Sequence[int]]]):
    """Run every row's tokens after its prompt KV → (logits (B, V), features (B, d), present, mask, last positions)."""
    inputs = prefill_inputs(rows, decoder.hidden_size)
    logits, features, present = decoder.step(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                             inputs["prompts"], inputs["past"])
    return logits, features, present, inputs["attention_mask"], inputs["position_ids"][:, -1]


def decode(steps: DecoderSession | Seq2SeqSession, rows: Sequence[tuple[object, Sequence[int]]], config: SamplingParams,
           eos_ids: Sequence[int] = (), rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row (task prefix, input ids), (B,) int64, step by step, until every row has
    produced an end-of-sequence token or `config.max_new_tokens` steps have run. Rows that ended keep receiving
    their eos id (ignored by the caller); a caller that has what it needs may stop iterating at any time."""
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    logits, _, state = steps.start(rows)
    done, some_done = np.zeros(len(rows), dtype=bool), False
    eos = np.array(list(eos_ids) or [-1], dtype=np.int64)
    for step in range(config.max_new_tokens):   # few numpy calls a step: each costs ~20 us after a graph call
        tokens = next_tokens(logits, config, rng)
        if some_done:
            tokens[done] = eos[0]
        yield tokens
        ended = tokens == eos[0] if len(eos) == 1 else (tokens[:, None] == eos).any(axis=1)
        if ended.any():
            done |= ended
            some_done = True
            if done.all():
                return
        if step + 1 == config.max_new_tokens:
            return
        logits, state = steps.advance(state, tokens)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def label_log_probs(steps: DecoderSession | Seq2SeqSession,
                    rows: Sequence[tuple[object, Sequence[int], Sequence[Sequence[int]]]]) -> list[np.ndarray]:
    """Whole-sequence verbalizers: for each row (task prefix, input ids, label token sequences), the summed
    log-probability of every label's tokens after the input → one (C,) array per row. One prefill, then one
    decode step per label token beyond the first, over all (row, label) pairs at once."""
    logits, _, state = steps.start([(prefix, ids) for prefix, ids, _ in rows])
    owner = np.repeat(np.arange(len(rows)), [len(labels) for _, _, labels in rows])
    sequences = [list(tokens) for _, _, labels in rows for tokens in labels]
    scores = log_softmax(logits)[owner, [tokens[0] for tokens in sequences]]
    longest = max(len(tokens) for tokens in sequences)
    if longest > 1:
        state = steps.select(state, owner)
        for j in range(1, longest):
            fed = np.array([tokens[min(j, len(tokens)) - 1] for tokens in sequences], np.int64)
            logits, state = steps.advance(state, fed)
            step = log_softmax(logits)
            for r, tokens in enumerate(sequences):
                if j < len(tokens):
                    scores[r] += step[r, tokens[j]]
    return np.split(scores.astype(np.float32), np.cumsum([len(labels) for _, _, labels in rows])[:-1])

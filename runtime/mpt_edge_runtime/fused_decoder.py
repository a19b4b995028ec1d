"""The runner of the fused causal generation graph (`decoder.onnx` of kind "decoder-fused"): onnxruntime's
GroupQueryAttention appends the KV cache inside the graph.

    prefix = steps.prefix(prompt)                        # once per task: the prompt's KV, (h_kv, l, d_h) per layer
    logits, features, state = steps.start([(prefix, ids), ...])
    logits, state = steps.advance(state, tokens)         # one decode step, tokens (B,); logits valid until the next one

It offers the calls of `generation.DecoderSession`, so `decode` and `label_log_probs` run on it unchanged. Rows
are right-padded and each row's cache is packed from position 0: [prompt KV | its tokens | unused], with
`total` (B,) = how many cache positions row b holds. Rows of different tasks mix freely (all prompts have l).
Decode steps write the new KV in place into buffers with room to grow (doubled when full), as
onnxruntime-genai does, instead of copying the whole cache every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.generation import Cache, cache_layout, right_padded
from mpt_edge_runtime.session import BoundCall, GraphSession

HEADROOM = 32   # cache positions a generation's buffers get beyond its prefill; doubled whenever they are full


def with_room(cache: Sequence[np.ndarray], capacity: int) -> list[np.ndarray]:
    """KV arrays (B, h_kv, K, d_h) copied into zeroed buffers (B, h_kv, capacity, d_h), capacity >= K."""
    buffers = []
    for part in cache:
        buffer = np.zeros((*part.shape[:2], capacity, part.shape[3]), np.float32)
        buffer[:, :, :part.shape[2]] = part
        buffers.append(buffer)
    return buffers


@dataclass(frozen=True)
class FusedDecoderSession:
    """The fused step graph: (ids, prompts, step lengths, total lengths, past) → logits, features, present."""

    graph: GraphSession
    layers: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def open(cls, graph: GraphSession, hidden_size: int) -> "FusedDecoderSession":
        _, vocab = {o.name: o.shape for o in graph.session.get_outputs()}[fmt.LOGITS]
        return cls(graph, *cache_layout(graph), hidden_size, int(vocab))

    def step(self, input_ids: np.ndarray, prompts: np.ndarray, step_lengths: np.ndarray, total: np.ndarray,
             past: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """One graph call: ids (B, n) right-padded, prompts (B, P, d), step_lengths (B,) real rows of [prompt | ids],
        total (B,) cache positions after the step → logits (B, V), features (B, d), present (B, h_kv, S+P+n, d_h)."""
        feeds = {fmt.INPUT_IDS: input_ids, fmt.PROMPT_EMBEDS: prompts, fmt.STEP_LENGTHS: step_lengths,
                 fmt.TOTAL_LENGTHS: total, **dict(zip(fmt.cache_names("past", self.layers), past))}
        logits, features, *present = self.graph.run([fmt.LOGITS, fmt.FEATURES, *fmt.cache_names("present", self.layers)],
                                                    feeds)
        return logits, features, present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def no_prompt(self, batch: int) -> np.ndarray:
        return np.zeros((batch, 0, self.hidden_size), np.float32)

    def prefix(self, prompt: np.ndarray) -> Cache:
        """A task's prompt (l, d) → its KV, one (h_kv, l, d_h) array per layer and part, computed once."""
        length = np.array([prompt.shape[0]], np.int64)
        _, _, present = self.step(np.zeros((1, 0), np.int64), prompt[None], length, length, self.empty_past(1))
        return tuple(p[0] for p in present)

    def start(self, rows: Sequence[tuple[Cache, Sequence[int]]]):
        """Every row's tokens after its task's prompt KV → logits (B, V), features (B, d), state."""
        ids, mask = right_padded([row_ids for _, row_ids in rows])
        lengths = mask.sum(axis=1)
        past = [np.stack([cache[k] for cache, _ in rows]) for k in range(len(rows[0][0]))]
        total = past[0].shape[2] + lengths
        logits, features, present = self.step(ids, self.no_prompt(len(rows)), lengths, total, past)
        return logits, features, self.state(present, total)

    def start_from_prompts(self, prompts: np.ndarray, rows: Sequence[Sequence[int]]):
        """[prompt | tokens] of every row through the graph with no cached KV, prompts (B, P, d) → logits (B, V),
        features (B, d), state: the work of `prefix` and `start` in one call (a row may have no tokens)."""
        ids, mask = right_padded(rows)
        lengths = prompts.shape[1] + mask.sum(axis=1)
        logits, features, present = self.step(ids, prompts, lengths, lengths, self.empty_past(len(rows)))
        return logits, features, self.state(present, lengths)

    def state(self, present: Sequence[np.ndarray], total: np.ndarray):
        """The decoding state after a `step` that returned `present` with `total` (B,) positions per row:
        (KV buffers, total, the longest row's total, the bound decode call or None)."""
        return with_room(present, present[0].shape[2] + HEADROOM), total, int(total.max()), None

    def features(self, rows: Sequence[tuple[Cache, Sequence[int]]]) -> np.ndarray:
        """The last input token's hidden state of each row, (B, d): what classification reads."""
        return self.start(rows)[1]

    def advance(self, state, tokens: np.ndarray):
        """One decode step; the state's buffers receive the new KV in place (the state passed in is used up), and
        the logits (B, V) returned are the decode call's own array: read them before the next `advance`. Few
        numpy calls on purpose: after a graph call each costs ~20 us of cold caches (bench/call_gap.py)."""
        buffers, total, longest, step = state
        if longest + 1 > buffers[0].shape[2]:
            buffers, step = with_room(buffers, 2 * buffers[0].shape[2]), None
        step = step or self._decode_step(buffers, total)
        np.add(step.total, 1, out=step.total)
        step.input_ids[:, 0] = tokens
        step.run({})
        return step.logits, (buffers, step.total, longest + 1, step)

    def select(self, state, index: np.ndarray):
        buffers, total, _, _ = state
        picked = total[index]
        return [b[index] for b in buffers], picked, int(picked.max()), None

    def _decode_step(self, buffers: list[np.ndarray], total: np.ndarray) -> "DecodeStep":
        """The decode call bound once to these KV buffers (written in place), to this batch's small inputs (changed
        in place before each call: nothing is bound again per token; `total` (B,) is copied in) and to its logits /
        features arrays."""
        batch = buffers[0].shape[0]
        input_ids, total = np.zeros((batch, 1), np.int64), total.astype(np.int64)
        logits = np.zeros((batch, self.vocab_size), np.float32)
        features = np.zeros((batch, self.hidden_size), np.float32)
        past, present = fmt.cache_names("past", self.layers), fmt.cache_names("present", self.layers)
        inputs = {fmt.INPUT_IDS: input_ids, fmt.PROMPT_EMBEDS: self.no_prompt(batch),
                  fmt.STEP_LENGTHS: np.ones(batch, np.int64), fmt.TOTAL_LENGTHS: total}
        run = self.graph.bind({**dict(zip(past, buffers)), **inputs}, dict(zip(present, past)),
                              {fmt.LOGITS: logits, fmt.FEATURES: features})
        return DecodeStep(run, input_ids, total, logits)


@dataclass(frozen=True)
class DecodeStep:
    """A generation's decode call, bound once: set `input_ids` (B, 1) and `total` (B, cache positions after the
    step), then `run({})` refreshes `logits` (B, V)."""

    run: BoundCall
    input_ids: np.ndarray
    total: np.ndarray
    logits: np.ndarray

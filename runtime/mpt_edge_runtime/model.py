"""The loaded model: a bundle's graph(s) in onnxruntime on one device, checked against the manifest, behind one
`runner` whatever the graph kind.

    model = Model.open(folder, manifest, device="cpu", threads=2)
    entry = model.prepare(entry)                    # sets entry.prefix: what the task's requests start from
    model.runner.features([(entry.prefix, ids), ...])   # (B, d) float32, for classification
    model.generates                                 # whether the runner also decodes (start / advance / select)

Runners: `FeaturesGraph` (model.onnx: classification only), `DecoderSession` (causal decoder.onnx with a KV
cache), `FusedDecoderSession` (the same with onnxruntime's fused ops, mpt_edge_runtime.fused_decoder) and
`Seq2SeqSession` (encoder.onnx + decoder.onnx); see mpt_edge_runtime.generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import BundleError, DeviceError
from mpt_edge_runtime.fused_decoder import FusedDecoderSession
from mpt_edge_runtime.generation import DecoderSession, Seq2SeqSession, right_padded
from mpt_edge_runtime.manifest import Manifest
from mpt_edge_runtime.session import GraphSession
from mpt_edge_runtime.task_table import TaskEntry


@dataclass(frozen=True)
class FeaturesGraph:
    """The features graph: (input_ids, attention_mask, prompt_embeds) → features, one forward per batch. A task's
    prefix is its prompt; the prompt runs with every request."""

    graph: GraphSession

    def prefix(self, prompt: np.ndarray) -> np.ndarray:
        return prompt

    def features(self, rows: Sequence[tuple[np.ndarray, Sequence[int]]]) -> np.ndarray:
        """rows: (prompt (l, d), token ids) → features (B, d) float32; ids right-padded."""
        input_ids, mask = right_padded([ids for _, ids in rows])
        return self.graph.features(input_ids, mask, np.stack([prompt for prompt, _ in rows]))


Runner = FeaturesGraph | DecoderSession | FusedDecoderSession | Seq2SeqSession
# graph kind → its inputs besides past.<i>.key / .value
KIND_INPUTS = {fmt.FEATURES_KIND: fmt.GRAPH_INPUTS, fmt.DECODER_KIND: fmt.DECODER_INPUTS,
               fmt.FUSED_DECODER_KIND: fmt.FUSED_DECODER_INPUTS}


@dataclass(frozen=True)
class Model:
    """A bundle's manifest and the runner of its graph(s)."""

    manifest: Manifest
    runner: Runner

    @property
    def generates(self) -> bool:
        """Whether the bundle has generation graphs (they serve classification too)."""
        return self.manifest.graph.kind != fmt.FEATURES_KIND

    @property
    def device(self) -> str:
        return self.runner.graph.device

    @property
    def float_type(self) -> type:
        """np.float32, or np.float16 for an fp16 graph."""
        return self.runner.graph.float_type

    def prepare(self, entry: TaskEntry) -> TaskEntry:
        """The task with its request prefix computed once, here (causal generation graph: the prompt's KV)."""
        return replace(entry, prefix=self.runner.prefix(entry.prompt))

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, device: str = "auto", threads: int | None = None) -> "Model":
        """Start the session(s) of the bundle in `folder` and check their inputs against the manifest."""
        graph = manifest.graph
        session = _open_session(folder / graph.file, graph.kind, device, threads)
        _check_graph(session, manifest, folder / graph.file)
        if graph.kind == fmt.DECODER_KIND:   # the generation graph serves every task, classify included
            return cls(manifest, DecoderSession.open(session, manifest.prompt.hidden_size))
        if graph.kind == fmt.FUSED_DECODER_KIND:
            return cls(manifest, FusedDecoderSession.open(session, manifest.prompt.hidden_size))
        if graph.kind == fmt.SEQ2SEQ_KIND:
            step = GraphSession.open(folder / graph.decoder_file, device, threads)
            _check_step_graph(step, folder / graph.decoder_file)
            return cls(manifest, Seq2SeqSession.open(session, step))
        return cls(manifest, FeaturesGraph(session))


def _open_session(path: Path, kind: str, device: str, threads: int | None) -> GraphSession:
    """The graph's session; a fused decoder that this onnxruntime cannot load names the two fixes."""
    try:
        return GraphSession.open(path, device, threads)
    except DeviceError:
        raise
    except Exception as err:  # noqa: BLE001 (onnxruntime raises its own exception types)
        if kind != fmt.FUSED_DECODER_KIND:
            raise
        import onnxruntime as ort
        raise BundleError(f"{path} is a fused decoder graph (GroupQueryAttention with query_seqlens) that onnxruntime "
                          f"{ort.__version__} cannot load ({type(err).__name__}: {str(err)[:300]}); upgrade onnxruntime "
                          "(>= 1.32) or re-export the bundle with `mpt-edge export --no-fuse`") from None


def _check_graph(session: GraphSession, manifest: Manifest, path: Path) -> None:
    inputs = {i.name: i.shape for i in session.session.get_inputs()}
    decoder = manifest.graph.kind in (fmt.DECODER_KIND, fmt.FUSED_DECODER_KIND)
    expected = set(KIND_INPUTS.get(manifest.graph.kind, fmt.GRAPH_INPUTS))   # seq2seq: its encoder takes these
    if set(inputs) - {n for n in inputs if decoder and n.startswith("past.")} != expected:
        raise BundleError(f"{path} has inputs {sorted(inputs)}, expected {sorted(expected)}"
                          f"{' and past.<i>.key/value' if decoder else ''}; re-export")
    dim = inputs[fmt.PROMPT_EMBEDS][-1]
    if isinstance(dim, int) and dim != manifest.prompt.hidden_size:
        raise BundleError(f"{path} takes prompts of hidden size {dim}, but {fmt.MANIFEST} says "
                          f"{manifest.prompt.hidden_size}; the bundle is inconsistent, re-export it")


def _check_step_graph(step: GraphSession, path: Path) -> None:
    names = {i.name for i in step.session.get_inputs()}
    cached = {n for n in names if n.startswith(("past.", "cross."))}
    if names - cached != set(fmt.SEQ2SEQ_STEP_INPUTS) or not cached:
        raise BundleError(f"{path} has inputs {sorted(names)}, expected {sorted(fmt.SEQ2SEQ_STEP_INPUTS)} and "
                          "past.<i>.key/value, cross.<i>.key/value; re-export")

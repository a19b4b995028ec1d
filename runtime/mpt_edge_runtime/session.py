"""The onnxruntime session behind an engine: device choice, threads, and one forward call.

    features = session.features(input_ids (B, n) int64, attention_mask (B, n) int64, prompts (B, l, d) float32)  # (B, d)

A CUDA request that cannot be honoured raises DeviceError; it never runs on the CPU instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when onnxruntime has its CUDA provider, else "cpu"; "cuda" without it is an error."""
    if device not in DEVICES:
        raise DeviceError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    if device == "auto":
        return "cuda" if CUDA in available else "cpu"
    if device == "cuda" and CUDA not in available:
        raise DeviceError(
            f"device 'cuda' was asked for, but this onnxruntime ({ort.__version__}) has no CUDA provider "
            f"(available: {', '.join(available)}); install `mpt-edge[gpu]` (onnxruntime-gpu) instead of onnxruntime, "
            "or pass device='cpu'"
        )
    return device


@dataclass
class GraphSession:
    """An InferenceSession of a bundle's graph on one device. `session.run` is safe to call from many threads."""

    session: ort.InferenceSession
    device: str
    float_type: type = np.float32

    @classmethod
    def open(cls, graph: Path, device: str = "auto", threads: int | None = None) -> "GraphSession":
        device = resolve_device(device)
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise DeviceError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        if device == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = [CUDA, CPU] if device == "cuda" else [CPU]
        session = ort.InferenceSession(str(graph), sess_options=options, providers=providers)
        if device == "cuda" and session.get_providers()[0] != CUDA:
            raise DeviceError(f"onnxruntime could not start its CUDA provider for {graph} (got {session.get_providers()}); "
                              "check the CUDA and cuDNN libraries, or pass device='cpu'")
        kinds = {i.name: i.type for i in session.get_inputs()}
        float_type = np.float16 if kinds.get(fmt.PROMPT_EMBEDS) == "tensor(float16)" else np.float32
        return cls(session, device, float_type)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph: float inputs are cast to the graph's float type, float outputs come back as float32."""
        feeds = {name: value.astype(self.float_type, copy=False) if value.dtype.kind == "f" else value.astype(np.int64, copy=False)
                 for name, value in feeds.items()}
        if self.device == "cuda":
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in outputs:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            results = binding.copy_outputs_to_cpu()
        else:
            results = self.session.run(outputs, feeds)
        return [r.astype(np.float32) if r.dtype.kind == "f" else r for r in results]

    def bind(self, buffers: dict[str, np.ndarray], aliases: dict[str, str],
             outputs: dict[str, np.ndarray]) -> "BoundCall":
        """A call repeated over the same arrays, bound once: `buffers` (input name → array) are inputs, each output
        named in `aliases` (output → input name) is written into that input's array in place (a KV cache that
        grows inside one preallocated buffer instead of being copied every step), and every output in `outputs`
        (name → array of its exact shape) lands in its array. Arrays are C-contiguous, float32 or int64 (an input
        array changed in place feeds the next call as it is). Calling the result runs the graph with the remaining
        inputs, if any. CPU binds the arrays' memory; CUDA copies."""
        if self.device != "cpu":
            return BoundCall(self, buffers, aliases, outputs)
        binding = self.session.io_binding()
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in {**buffers, **outputs}.items()}
        for name in buffers:
            binding.bind_ortvalue_input(name, values[name])
        for output, target in aliases.items():
            binding.bind_ortvalue_output(output, values[target])
        for name in outputs:
            binding.bind_ortvalue_output(name, values[name])
        return BoundCall(self, buffers, aliases, outputs, binding, values)

    def features(self, input_ids: np.ndarray, attention_mask: np.ndarray, prompts: np.ndarray) -> np.ndarray:
        """(B, n), (B, n), (B, l, d) → features (B, d) float32."""
        return self.run([fmt.FEATURES], {fmt.INPUT_IDS: input_ids, fmt.ATTENTION_MASK: attention_mask,
                                         fmt.PROMPT_EMBEDS: prompts})[0]


@dataclass(frozen=True)
class BoundCall:
    """`GraphSession.bind`'s result: `call(feeds)` runs the graph and leaves every result in its bound array."""

    graph: GraphSession
    buffers: dict[str, np.ndarray]
    aliases: dict[str, str]
    outputs: dict[str, np.ndarray]
    binding: object = None          # onnxruntime IOBinding on CPU; None: run, then copy into the arrays
    values: dict | None = None      # the OrtValues over the arrays' memory, alive as long as the binding

    def __call__(self, feeds: dict[str, np.ndarray]) -> None:
        if self.binding is None:
            targets = [*self.outputs.values(), *(self.buffers[name] for name in self.aliases.values())]
            for target, value in zip(targets, self.graph.run([*self.outputs, *self.aliases], {**feeds, **self.buffers})):
                np.copyto(target, value)
            return
        kept = {name: value.astype(self.graph.float_type, copy=False) if value.dtype.kind == "f"
                else value.astype(np.int64, copy=False) for name, value in feeds.items()}
        for name, value in kept.items():
            self.binding.bind_cpu_input(name, value)
        self.graph.session.run_with_iobinding(self.binding)

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

    def features(self, input_ids: np.ndarray, attention_mask: np.ndarray, prompts: np.ndarray) -> np.ndarray:
        """(B, n), (B, n), (B, l, d) → features (B, d) float32."""
        feeds = {fmt.INPUT_IDS: input_ids.astype(np.int64), fmt.ATTENTION_MASK: attention_mask.astype(np.int64),
                 fmt.PROMPT_EMBEDS: prompts.astype(self.float_type)}
        if self.device == "cuda":
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output(fmt.FEATURES, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0].astype(np.float32)
        return self.session.run([fmt.FEATURES], feeds)[0].astype(np.float32)

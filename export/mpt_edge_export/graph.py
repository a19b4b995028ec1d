"""The exported graph: a frozen backbone whose prompt is an input, returning one feature vector per row.

    (input_ids (B, n) int64, attention_mask (B, n) int64, prompt_embeds (B, l, d)) → features (B, d)

`features` is what label scoring reads (the last real position's hidden state for causal backbones,
pooled real tokens for encoders); heads and prompts stay outside the graph, so one graph serves every task.
The forward is the family adapter's, the same code training runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mpt_edge.errors import ExportError
from mpt_edge_runtime import format as fmt

DEFAULT_OPSET = 17


class PromptedFeatures(nn.Module):
    """Flat-tensor wrapper of a backbone and its family adapter, for tracing."""

    def __init__(self, model: nn.Module, adapter):
        super().__init__()
        self.model, self.adapter = model, adapter

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.adapter.forward(self.model, prompt_embeds, input_ids, attention_mask).features


def sample_inputs(batch: int, length: int, prompt_length: int, hidden: int, vocab: int,
                  generator: torch.Generator, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ids (B, n), a right-padded mask (last row cut to half when `padded`), prompts (B, l, d)."""
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded and batch > 1:
        mask[-1, max(1, length // 2):] = 0
    prompts = torch.randn(batch, prompt_length, hidden, generator=generator) * 0.05
    return ids, mask, prompts


def export_graph(wrapper: PromptedFeatures, path: Path, prompt_length: int, hidden: int, vocab: int,
                 opset: int = DEFAULT_OPSET) -> None:
    """Trace `wrapper` with the TorchScript exporter (dynamic batch, sequence and prompt length) into `path`."""
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    example = sample_inputs(2, 8, prompt_length, hidden, vocab, torch.Generator().manual_seed(0))
    dynamic = {**fmt.GRAPH_INPUTS, **fmt.GRAPH_OUTPUTS}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(wrapper.eval(), example, str(path), input_names=list(fmt.GRAPH_INPUTS),
                          output_names=list(fmt.GRAPH_OUTPUTS), dynamic_axes=dynamic, opset_version=opset,
                          dynamo=False, do_constant_folding=True)


@contextmanager
def traced_attention(model: nn.Module, implementation: str | None) -> Iterator[None]:
    """Within the block the model runs transformers' `implementation` of attention ("eager", "sdpa"; None: its
    own); its own is restored after, even when the block fails."""
    own = getattr(model.config, "_attn_implementation", None)
    if implementation is None or implementation == own:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(own)


def eos_token_ids(model: nn.Module) -> list[int]:
    """The end-of-sequence token ids generation stops at (generation config first, then the model config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])

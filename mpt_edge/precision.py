"""The precision of a training forward: fp32, or bf16 autocast with attention kept in fp32.

Under CPU bf16 autocast the projections and MLPs run as bf16 GEMMs (about 2× faster on a CPU with native bf16),
but PyTorch's CPU flash attention is 3× slower backward in bf16 than in fp32 (MiniLM: 56 vs 17 ms a layer), so
the bf16 forward computes scaled-dot-product attention in fp32. Everything trained, the optimizer, the losses and
the evaluations stay fp32 (docs/performance.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16")


def resolve_precision(choice: str) -> str:
    """'auto' → bf16 where the CPU computes bf16 natively (AVX-512 BF16 or AMX), else fp32; others unchanged.

    Without native bf16 the casts are emulated and a step gets slower, so 'auto' keeps fp32 there.
    """
    if choice != "auto":
        return choice
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "fp32"


@contextlib.contextmanager
def forward_precision(precision: str) -> Iterator[None]:
    """The context a training forward runs in: nothing for fp32; for bf16, CPU bf16 autocast with transformers'
    SDPA attention computed in fp32 (restored on exit, also after an error)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast("cpu", dtype=torch.bfloat16), _fp32_attention():
        yield


@contextlib.contextmanager
def _fp32_attention() -> Iterator[None]:
    """Within the block, every transformers model with SDPA attention computes it in fp32 from any q, k, v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def sdpa_in_fp32(module, query, key, value, attention_mask, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                  attention_mask, *args, **kwargs)
        return out.to(query.dtype), weights

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_in_fp32
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]

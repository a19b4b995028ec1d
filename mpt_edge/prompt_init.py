"""Initialisation strategies: pure functions that return tensors (no I/O, no modules).

Prompts are (l, d); factor pairs are u (T, l, r), v (T, r, d).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpt_edge.errors import ConfigError

PROMPT_INITS = ("vocab", "random", "text")


def vocab_prompt(embeddings: torch.Tensor, length: int, generator: torch.Generator, top: int = 5000) -> torch.Tensor:
    """Rows sampled without replacement from the first `top` vocabulary embeddings (Lester et al.): (l, d).

    BPE vocabularies put frequent tokens first, so the first 5000 ids stand in for "common tokens".
    """
    pool = min(top, embeddings.shape[0])
    if length <= pool:
        ids = torch.randperm(pool, generator=generator)[:length]
    else:
        ids = torch.randint(0, pool, (length,), generator=generator)
    return embeddings[ids].detach().clone().float()


def random_prompt(length: int, dim: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """N(0, scale²) entries, `scale` usually the std of the embedding table: (l, d)."""
    return torch.randn(length, dim, generator=generator) * scale


def text_prompt(embeddings: torch.Tensor, token_ids: Sequence[int], length: int) -> torch.Tensor:
    """Embeddings of `token_ids`, repeated cyclically to `length` rows: (l, d)."""
    if not token_ids:
        raise ConfigError("text init needs a non-empty init text; pass e.g. --init-text 'Classify the sentiment'")
    index = torch.tensor([token_ids[i % len(token_ids)] for i in range(length)])
    return embeddings[index].detach().clone().float()


def identity_factors(tasks: int, length: int, rank: int, dim: int, generator: torch.Generator,
                     noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """u (T, l, r), v (T, r, d) with u_k v_k ≈ all-ones, so that P_k starts at P*.

    For r > 1 a little noise breaks the symmetry between the r components (identical ones would get
    identical gradients forever); for r = 1 the product is exactly ones.
    """
    u = torch.full((tasks, length, rank), rank**-0.5)
    v = torch.full((tasks, rank, dim), rank**-0.5)
    if rank > 1:
        u = u + noise * torch.randn(u.shape, generator=generator)
        v = v + noise * torch.randn(v.shape, generator=generator)
    return u, v


def factors_from_source(u: torch.Tensor, v: torch.Tensor, tasks: int,
                        source_task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Target factors from source factors u (S, l, r), v (S, r, d) → (T, l, r), (T, r, d).

    `source_task=None` averages over the source tasks [paper]; an index copies that one task's pair.
    """
    if source_task is None:
        u0, v0 = u.mean(dim=0), v.mean(dim=0)
    else:
        if not 0 <= source_task < u.shape[0]:
            raise ValueError(f"source task index {source_task} is out of range for {u.shape[0]} source tasks")
        u0, v0 = u[source_task], v[source_task]
    return u0.expand(tasks, *u0.shape).clone(), v0.expand(tasks, *v0.shape).clone()


def extend_factors(u: torch.Tensor, v: torch.Tensor, rank: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors u (T, l, r), v (T, r, d) → (T, l, rank), (T, rank, d), rank >= r, with exactly the same product: the
    new columns of u are zeros and the new rows of v are random at v's scale, so the new parts start contributing
    nothing but get a gradient (through v) from the first step. Adafactor scales a step by the RMS of the whole
    (l, rank) tensor, so the zero columns move at the old columns' scale."""
    tasks, length, r = u.shape
    extra = rank - r
    rows = torch.randn((tasks, extra, v.shape[2]), generator=generator) * v.pow(2).mean().sqrt()
    return torch.cat([u, u.new_zeros((tasks, length, extra))], dim=2), torch.cat([v, rows.to(v.dtype)], dim=1)


def split_factors(u: torch.Tensor, v: torch.Tensor, rank: int, generator: torch.Generator,
                  noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors u (T, l, r), v (T, r, d) → (T, l, rank), (T, rank, d), rank a multiple of r, with the same product
    to O(noise²): each component becomes rank / r equal parts scaled by sqrt(r / rank), plus noise of relative size
    `noise` that sums to zero over the parts. Their differences enter the product only at second order, so it
    moves as the rank-r product would until they grow (`extend_factors` has no such start); kept for the record of
    the first rank-2 ablation (bench/suites/transfer-factor-rank2.toml)."""
    tasks, length, r = u.shape
    if rank % r:
        raise ConfigError(f"factor rank {rank} must be a multiple of the source's rank {r} to split its factors")
    parts, scale = rank // r, (r / rank) ** 0.5

    def split(x: torch.Tensor, dim: int) -> torch.Tensor:
        copies = x.repeat_interleave(parts, dim=dim) * scale
        jitter = torch.randn(copies.shape, generator=generator)
        grouped = jitter.unflatten(dim, (r, parts))
        jitter = (grouped - grouped.mean(dim=dim + 1, keepdim=True)).flatten(dim, dim + 1)
        return copies + noise * copies.abs().mean() * jitter

    return split(u, 2), split(v, 1)


FACTOR_GROWTHS = {"extend": extend_factors, "split": split_factors}   # how a target's U V gains rank


def init_prompt(strategy: str, embeddings: torch.Tensor, length: int, generator: torch.Generator,
                text_ids: Sequence[int] = ()) -> torch.Tensor:
    """Dispatch one of PROMPT_INITS: (l, d)."""
    if strategy == "vocab":
        return vocab_prompt(embeddings, length, generator)
    if strategy == "random":
        return random_prompt(length, embeddings.shape[1], generator, float(embeddings.float().std()))
    if strategy == "text":
        return text_prompt(embeddings, text_ids, length)
    raise ConfigError(f"prompt init {strategy!r} is not supported; allowed: {', '.join(PROMPT_INITS)}")

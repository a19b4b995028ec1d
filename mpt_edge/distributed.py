"""Data-parallel training over torch.distributed (launched by `torchrun`).

Every rank builds the same global batch (the sampler is a pure function of seed and step, so the task
mixture and the stochastic task sampling are those of the global batch), trains on its shard of the rows
(rank r takes rows r, r + W, r + 2W, …), and the gradients are summed across ranks before every optimizer
step. Each loss term is normalised by counts over the global batch (`mpt_edge.losses.Totals`), so the
shards' losses add up to the global batch's loss and W ranks take the same steps as one process, up to
float summation order. Only the trainable prompt and heads have gradients (a few KB), so this is DDP's
gradient all-reduce without its bucketing. Rank 0 writes checkpoints and logs; every rank reads the
checkpoint folder on `--resume`, so it must be on a filesystem every rank sees.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import distributed as dist

from mpt_edge.batching import Batch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def leave() -> None:
    """Leave the process group, if one was joined, so that gloo's threads stop before the interpreter exits (a rank
    that exits with them running can abort: 'terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> Ranks:
    """This process's place in the initialised process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env() -> Ranks:
    """Join the process group that `torchrun` describes (WORLD_SIZE > 1 in the environment). Training tensors
    live on the CPU, so the backend is gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return current()


def shard(batch: Batch, ranks: Ranks) -> Batch:
    """Rows rank, rank + W, … of the global batch (padding width kept: right padding changes nothing)."""
    if ranks.world == 1:
        return batch
    rows = slice(ranks.rank, None, ranks.world)
    return replace(batch, input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                   labels=batch.labels[rows], task_ids=batch.task_ids[rows],
                   target_mask=batch.target_mask[rows] if batch.target_mask is not None else None)


def sum_gradients(params: Sequence[torch.Tensor], ranks: Ranks) -> None:
    """All-reduce (sum) the gradients of `params`. A tensor that has a gradient on some rank gets one on every
    rank (zeros where its task missed the shard); one that none has (its task missed the global batch) keeps
    None, as in a single process, so the optimizer leaves it and its state alone."""
    if ranks.world == 1:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, flag in zip(params, has.tolist()):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def sum_values(values: Sequence[float], ranks: Ranks) -> list[float]:
    """Sum floats across ranks (shard losses add up to the global batch's loss)."""
    if ranks.world == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(value: float, ranks: Ranks) -> float:
    """Rank 0's `value` on every rank (a tensor broadcast: nothing is pickled)."""
    if ranks.world == 1:
        return value
    tensor = torch.tensor([value if ranks.main else 0.0], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()

"""MultitaskPrompt: composition, folding, mixed batches, and agreement with PEFT's implementation."""

from __future__ import annotations

import pytest
import torch

from mpt_edge.errors import ConfigError
from mpt_edge.prompt_init import (extend_factors, factors_from_source, identity_factors, init_prompt, split_factors,
                                     text_prompt, vocab_prompt)
from mpt_edge.prompt import MultitaskPrompt, PromptConfig


def random_prompt_module(tasks=3, length=5, rank=1, dim=8, groups=1, seed=0) -> MultitaskPrompt:
    g = torch.Generator().manual_seed(seed)
    return MultitaskPrompt(torch.randn(groups, length, dim, generator=g), torch.randn(tasks, length, rank, generator=g),
                           torch.randn(tasks, rank, dim, generator=g), [k % groups for k in range(tasks)])


@pytest.mark.parametrize("rank", [1, 3])
def test_compose_is_hadamard_of_shared_and_low_rank_product(rank):
    prompt = random_prompt_module(rank=rank)
    t = prompt.tensors()
    for k in range(3):
        expected = t["prompt.shared"][0] * (t["prompt.u"][k] @ t["prompt.v"][k])
        torch.testing.assert_close(prompt.compose(torch.tensor([k]))[0], expected, rtol=0, atol=0)


def test_fold_equals_compose_and_mixed_batches_get_their_own_prompts():
    prompt = random_prompt_module(tasks=4, groups=2, rank=2)
    folded = prompt.fold()
    assert folded.shape == (4, 5, 8)
    for k in range(4):
        torch.testing.assert_close(folded[k], prompt.compose(torch.tensor([k]))[0], rtol=0, atol=0)
    ids = torch.tensor([2, 0, 2, 3, 1])
    torch.testing.assert_close(prompt.compose(ids), folded[ids], rtol=0, atol=0)
    assert not torch.equal(folded[0], folded[1])


def test_groups_share_p_star():
    prompt = random_prompt_module(tasks=4, groups=2)
    with torch.no_grad():
        prompt.shared[1].zero_()
    folded = prompt.fold()
    assert folded[1].abs().sum() == 0 and folded[3].abs().sum() == 0 and folded[0].abs().sum() > 0


def test_matches_peft_multitask_prompt_embedding():
    peft = pytest.importorskip("peft")
    from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding

    tasks, length, rank, dim = 3, 6, 2, 10
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length, num_tasks=tasks,
                                              num_ranks=rank, token_dim=dim, num_transformer_submodules=1,
                                              num_attention_heads=2, num_layers=1)
    ours = random_prompt_module(tasks=tasks, length=length, rank=rank, dim=dim, seed=3)
    t = ours.tensors()
    theirs = MultitaskPromptEmbedding(config, torch.nn.Embedding(20, dim))
    with torch.no_grad():
        theirs.embedding.weight.copy_(t["prompt.shared"][0])
        theirs.prefix_task_cols.copy_(t["prompt.u"])
        theirs.prefix_task_rows.copy_(t["prompt.v"])
    task_ids = torch.tensor([0, 2, 1, 2])
    indices = torch.arange(length).expand(len(task_ids), length)
    torch.testing.assert_close(ours.compose(task_ids), theirs(indices, task_ids))


def test_shape_and_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="factor shapes"):
        MultitaskPrompt(torch.zeros(1, 5, 8), torch.zeros(2, 4, 1), torch.zeros(2, 1, 8), [0, 0])
    with pytest.raises(ValueError, match="task_groups"):
        MultitaskPrompt(torch.zeros(1, 5, 8), torch.zeros(2, 5, 1), torch.zeros(2, 1, 8), [0, 1])
    with pytest.raises(ValueError, match="prompt length"):
        PromptConfig(length=0)
    with pytest.raises(ValueError, match="rank"):
        PromptConfig(rank=0)


def test_init_strategies_are_pure_and_shaped():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    table = torch.randn(50, 8)
    assert torch.equal(vocab_prompt(table, 7, g()), vocab_prompt(table, 7, g()))
    rows = vocab_prompt(table, 7, g())
    assert all(any(torch.equal(r, e) for e in table) for r in rows)
    assert init_prompt("random", table, 7, g()).shape == (7, 8)
    text = text_prompt(table, [3, 4], 5)
    assert torch.equal(text[2], table[3]) and torch.equal(text[3], table[4])
    with pytest.raises(ValueError, match="not supported"):
        init_prompt("zeros", table, 7, g())
    u, v = identity_factors(2, 5, 1, 8, g())
    assert torch.equal(u[0] @ v[0], torch.ones(5, 8))
    u3, v3 = identity_factors(2, 5, 3, 8, g())
    assert torch.allclose(u3[0] @ v3[0], torch.ones(5, 8), atol=0.2) and not torch.equal(u3[0, :, 0], u3[0, :, 1])
    src_u, src_v = torch.randn(3, 5, 2), torch.randn(3, 2, 8)
    mu, mv = factors_from_source(src_u, src_v, 4)
    assert mu.shape == (4, 5, 2) and torch.allclose(mu[3], src_u.mean(0)) and torch.allclose(mv[0], src_v.mean(0))
    one_u, _ = factors_from_source(src_u, src_v, 2, source_task=1)
    assert torch.equal(one_u[0], src_u[1])


def test_split_factors_keep_the_product_and_give_the_parts_room_to_differ():
    g = torch.Generator().manual_seed(2)
    u, v = 1 + 0.3 * torch.randn(2, 5, 1, generator=g), 1 + 0.3 * torch.randn(2, 1, 8, generator=g)
    u4, v4 = split_factors(u, v, 4, g)
    assert u4.shape == (2, 5, 4) and v4.shape == (2, 4, 8)
    torch.testing.assert_close(u4 @ v4, u @ v, atol=2e-3, rtol=0)          # equal up to the noise squared
    assert not torch.equal(u4[..., 0], u4[..., 1]) and not torch.equal(v4[:, 0], v4[:, 1])
    assert float(u4.abs().min()) > 0.1                                      # no zero parts for Adafactor to leave
    same_u, _ = split_factors(u, v, 1, g)
    assert torch.equal(same_u, u)
    with pytest.raises(ConfigError, match="multiple of the source's rank 2 to split"):
        split_factors(torch.ones(1, 5, 2), torch.ones(1, 2, 8), 3, g)


def test_extend_factors_keep_the_product_exactly_and_the_new_parts_get_a_gradient():
    g = torch.Generator().manual_seed(3)
    u, v = 1 + 0.3 * torch.randn(2, 5, 1, generator=g), 1 + 0.3 * torch.randn(2, 1, 8, generator=g)
    u3, v3 = extend_factors(u, v, 3, g)
    assert u3.shape == (2, 5, 3) and v3.shape == (2, 3, 8)
    assert torch.equal(u3 @ v3, u @ v) and torch.equal(u3[..., :1], u) and torch.equal(v3[:, :1], v)
    assert not torch.equal(v3[:, 1], v3[:, 2]) and float(v3[:, 1:].std()) > 0.1
    u3.requires_grad_(True)
    (u3 @ v3).pow(2).sum().backward()
    assert float(u3.grad[..., 1:].abs().sum()) > 0   # zero columns, but they learn from the first step

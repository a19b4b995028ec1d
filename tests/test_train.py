"""Training stages on tiny random backbones: frozen backbone, gradients, losses, resume, distillation."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import synthetic_task
from mpt_edge import stages
from mpt_edge.backbones import fingerprint
from mpt_edge.batching import collate, encode_tasks
from mpt_edge.evaluate import dev_scorer, evaluate_trained
from mpt_edge.checkpoint import CheckpointError, load_checkpoint
from mpt_edge.errors import ConfigError
from mpt_edge.methods.target import LR_FACTORS
from mpt_edge.losses import DistillConfig, Totals, distillation_loss, hidden_distillation, logits_distillation
from mpt_edge.prompt import PromptConfig
from mpt_edge.precision import forward_precision, resolve_precision
from mpt_edge.training_loop import SOURCE_LR_FACTORS, TrainConfig, fit
from mpt_edge.trained import load_trained

PROMPT = PromptConfig(length=4)


def config(**kw) -> TrainConfig:
    # tiny random backbones want a larger relative step than the real-backbone default (0.03)
    return TrainConfig(**{"steps": 30, "batch_size": 8, "max_length": 32, "checkpoint_every": 10, "lr_prompt": 0.3,
                          **kw})


def encoded(backbone, *names, count=48, seed=0):
    return encode_tasks([synthetic_task(n, count, seed) for n in names], backbone.tokenizer, 32)


def first_last_loss(history: list[dict]) -> tuple[float, float]:
    return history[0]["loss"], history[-1]["loss"]


@pytest.fixture
def source_runs(backbone, tmp_path):
    """Teachers and source checkpoints on two synthetic source tasks."""
    src = encoded(backbone, "polarity", "topic")
    cfg = config()
    fit(stages.prompt_tuning("teachers", backbone, src, cfg, PROMPT), src, cfg, tmp_path / "teachers", progress=False)
    teachers = load_trained(tmp_path / "teachers")
    fit(stages.source(backbone, src, teachers, cfg, rank=2), src, cfg, tmp_path / "source", progress=False)
    return teachers, load_trained(tmp_path / "source")


def test_backbone_stays_bit_identical_and_only_prompt_params_get_grads(backbone, tmp_path):
    before = fingerprint(backbone.model)
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    src = encoded(backbone, "polarity", "topic")
    plan = stages.prompt_tuning("teachers", backbone, src, config(steps=3), PROMPT)
    loss, _ = plan.loss_fn(collate(src, plan.sampler.batch(0)))
    loss.backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    assert plan.prompt.shared[0].grad is not None and plan.prompt.shared[1].grad is None  # step 0 is task 0 only
    assert all(p.grad is None for p in [*plan.prompt.u, *plan.prompt.v])  # vanilla PT: factors frozen at ones
    fit(plan, src, config(steps=3), tmp_path / "run", progress=False)
    assert fingerprint(backbone.model) == before
    assert all(torch.equal(v, backbone.model.state_dict()[k]) for k, v in weights.items())


def test_every_stage_lowers_the_loss(backbone, source_runs, tmp_path):
    teachers, source = source_runs
    assert first_last_loss(teachers.meta.history)[1] < first_last_loss(teachers.meta.history)[0]
    assert first_last_loss(source.meta.history)[1] < first_last_loss(source.meta.history)[0]
    tgt = encoded(backbone, "mood", "polarity")
    cfg = config()
    plans = {f"target-{m}": stages.target(backbone, tgt, source, cfg, mode=m) for m in ("full", "factors")}
    # group mode shares P* across both tasks, so its steps are not per task: give it the same total budget
    plans["target-group"] = stages.target(backbone, tgt, source, config(steps=60), mode="group")
    plans["pt"] = stages.prompt_tuning("pt", backbone, tgt, cfg, PROMPT)
    if backbone.family.uses_heads:
        plans["head"] = stages.head_only(backbone, tgt, cfg)
    for name, plan in plans.items():   # the loss over every training example: the window means of sampled
        run_cfg = config(steps=60) if name == "target-group" else cfg   # batches are too noisy to compare
        first = dataset_loss(plan, tgt)
        fit(plan, tgt, run_cfg, tmp_path / name, progress=False)
        last = dataset_loss(plan, tgt)
        assert last < first, f"{name}: loss {first:.4f} → {last:.4f}"


def dataset_loss(plan, tasks) -> float:
    """The plan's loss over every example of `tasks` in one batch."""
    rows = [(t, i) for t, task in enumerate(tasks) for i in range(len(task.labels))]
    batch = collate(tasks, rows)
    with torch.no_grad():
        return float(plan.loss_fn(batch, Totals.of(batch))[0])


def test_target_modes_train_the_right_parameters(backbone, source_runs):
    _, source = source_runs
    tgt = encoded(backbone, "mood", "polarity")
    full = stages.target(backbone, tgt, source, config(), mode="full")
    factors = stages.target(backbone, tgt, source, config(), mode="factors")
    group = stages.target(backbone, tgt, source, config(), mode="group")
    assert len(full.prompt.shared) == 2 and all(p.requires_grad for p in full.prompt.shared)
    assert len(factors.prompt.shared) == 1 and not factors.prompt.shared[0].requires_grad
    assert all(p.requires_grad for p in [*factors.prompt.u, *factors.prompt.v])
    assert len(group.prompt.shared) == 1 and group.prompt.shared[0].requires_grad
    src = source.prompt.tensors()
    torch.testing.assert_close(full.prompt.u[1].detach(), src["prompt.u"].mean(0))
    torch.testing.assert_close(full.prompt.shared[1].detach(), src["prompt.shared"][0])
    one = stages.target(backbone, tgt, source, config(), mode="full", factor_init="topic")
    torch.testing.assert_close(one.prompt.v[0].detach(), src["prompt.v"][source.index_of("topic")])


def test_factors_mode_defaults_to_rank_2_and_other_modes_to_the_sources_rank(backbone, source_runs, tmp_path):
    teachers, rank_2 = source_runs
    src, cfg = encoded(backbone, "polarity", "topic"), config(steps=2)
    fit(stages.source(backbone, src, teachers, cfg, rank=1), src, cfg, tmp_path / "rank-1", progress=False)
    rank_1, tgt = load_trained(tmp_path / "rank-1"), encoded(backbone, "mood")
    ranks = {(mode, source.prompt.rank, factor_rank): stages.target(backbone, tgt, source, cfg, mode=mode,
                                                                    factor_rank=factor_rank).prompt.rank
             for mode in ("full", "factors", "group") for source in (rank_1, rank_2) for factor_rank in (None, 0)}
    assert ranks == {("full", 1, None): 1, ("factors", 1, None): 2, ("group", 1, None): 1,
                     ("full", 2, None): 2, ("factors", 2, None): 2, ("group", 2, None): 2,
                     **{(mode, r, 0): r for mode in ("full", "factors", "group") for r in (1, 2)}}
    assert LR_FACTORS == {"full": 0.015, "factors": 0.05, "group": 0.015}


def test_an_unset_factor_rate_is_the_stages_and_is_recorded(backbone, source_runs, tmp_path):
    """TrainConfig(lr_factors=None): 0.4 for sources, LR_FACTORS[mode] for targets, 0.015 elsewhere; set: as set."""
    teachers, source = source_runs
    src, tgt, cfg = encoded(backbone, "polarity", "topic"), encoded(backbone, "mood"), config(steps=1)
    assert cfg.lr_factors is None
    plans = {"teachers": stages.prompt_tuning("teachers", backbone, src, cfg, PROMPT),
             "source": stages.source(backbone, src, teachers, cfg, rank=2),
             **{mode: stages.target(backbone, tgt, source, cfg, mode=mode) for mode in ("full", "factors", "group")}}
    expected = {"teachers": 0.015, "source": SOURCE_LR_FACTORS, "full": 0.015, "factors": 0.05, "group": 0.015}
    assert {name: plan.resolved(cfg).lr_factors for name, plan in plans.items()} == expected
    u = plans["factors"].prompt.u[0]
    assert [g["lr"] for g in plans["factors"].param_groups(cfg) if any(p is u for p in g["params"])] == [0.05]
    index = fit(plans["factors"], tgt, cfg, tmp_path / "factors", progress=False)
    assert index["train"]["lr_factors"] == 0.05
    chosen = replace(cfg, lr_factors=0.2)
    assert plans["factors"].resolved(chosen) == chosen and plans["source"].resolved(chosen).lr_factors == 0.2


def test_a_higher_factor_rank_starts_from_the_same_prompts_and_is_recorded(backbone, source_runs):
    _, source = source_runs
    tgt = encoded(backbone, "mood", "polarity")
    base = stages.target(backbone, tgt, source, config(), mode="factors")             # the source's rank, 2
    grown = stages.target(backbone, tgt, source, config(), mode="factors", factor_rank=5)
    split = stages.target(backbone, tgt, source, config(), mode="factors", factor_rank=4, factor_growth="split")
    assert base.prompt.rank == 2 and grown.prompt.rank == 5 and grown.meta["prompt"]["rank"] == 5
    ids = torch.tensor([0, 1])
    torch.testing.assert_close(grown.prompt.compose(ids), base.prompt.compose(ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(split.prompt.compose(ids), base.prompt.compose(ids), atol=5e-3, rtol=0)
    trainable = sum(p.numel() for p in grown.prompt.parameters() if p.requires_grad)
    assert trainable == 2 * 5 * (grown.prompt.length + grown.prompt.hidden_size)   # two tasks, rank 5
    with pytest.raises(ConfigError, match="factor growth must be one of extend, split"):
        stages.target(backbone, tgt, source, config(), mode="factors", factor_rank=4, factor_growth="grow")
    with pytest.raises(ConfigError, match="factor rank 1 is below the source's rank 2"):
        stages.target(backbone, tgt, source, config(), mode="factors", factor_rank=1)
    with pytest.raises(ConfigError, match="factor rank must be an integer >= 0"):
        stages.target(backbone, tgt, source, config(), mode="factors", factor_rank=-1)


def test_distillation_loss_is_zero_for_identical_student_and_positive_otherwise():
    logits, hidden = torch.randn(4, 3), torch.randn(4, 5, 8)
    mask = torch.ones(4, 5)
    same, parts = distillation_loss(logits, logits, hidden, hidden, mask, DistillConfig())
    assert same.abs() < 1e-6 and parts["kl"] < 1e-6 and parts["mse"] == 0
    assert logits_distillation(logits + torch.randn(4, 3), logits, temperature=2.0) > 0
    assert hidden_distillation(hidden + 0.1, hidden, mask) > 0
    mask[:, 3:] = 0
    changed = hidden.clone()
    changed[:, 3:] += 5.0  # padding positions do not count
    assert hidden_distillation(changed, hidden, mask) == 0


def test_source_stage_distils_and_gradients_reach_shared_and_factors(backbone, tmp_path):
    src = encoded(backbone, "polarity", "topic")
    cfg = config(steps=2)
    fit(stages.prompt_tuning("teachers", backbone, src, cfg, PROMPT), src, cfg, tmp_path / "t", progress=False)
    teachers = load_trained(tmp_path / "t")
    plan = stages.source(backbone, src, teachers, cfg, rank=2, shared_init="vocab")
    batch = collate(src, plan.sampler.batch(0))
    loss, parts = plan.loss_fn(batch)
    assert parts["kl"] > 0 and parts["mse"] > 0
    loss.backward()
    tasks = set(batch.task_ids.tolist())
    assert plan.prompt.shared[0].grad is not None and plan.prompt.shared[0].grad.abs().sum() > 0
    for k in tasks:
        assert plan.prompt.u[k].grad.abs().sum() > 0 and plan.prompt.v[k].grad.abs().sum() > 0


def test_student_equal_to_teacher_has_zero_distillation(backbone, tmp_path):
    """One source task, P* = the teacher's prompt, u v = ones, heads copied: student == teacher at step 0."""
    src = encoded(backbone, "polarity")
    cfg = config(steps=3)
    fit(stages.prompt_tuning("teachers", backbone, src, cfg, PROMPT), src, cfg, tmp_path / "t", progress=False)
    teachers = load_trained(tmp_path / "t")
    plan = stages.source(backbone, src, teachers, cfg, rank=1, shared_init="teachers")
    torch.testing.assert_close(plan.prompt.fold(), teachers.prompt.fold(), rtol=0, atol=0)
    _, parts = plan.loss_fn(collate(src, plan.sampler.batch(0)))
    assert parts["kl"] < 1e-6 and parts["mse"] < 1e-10


def test_resume_equals_uninterrupted(backbone, tmp_path):
    src = encoded(backbone, "polarity", "topic")
    cfg = config(steps=12, checkpoint_every=4)
    teachers_cfg = config(steps=2)
    fit(stages.prompt_tuning("teachers", backbone, src, teachers_cfg, PROMPT), src, teachers_cfg, tmp_path / "t",
        progress=False)
    teachers = load_trained(tmp_path / "t")
    fit(stages.source(backbone, src, teachers, cfg, rank=2), src, cfg, tmp_path / "whole", progress=False)

    doomed = stages.source(backbone, src, teachers, cfg, rank=2)
    calls = {"n": 0}
    inner = doomed.loss_fn

    def dies_at_step_10(batch, totals):  # killed after the step-8 checkpoint, mid-way to the next one
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return inner(batch, totals)

    doomed.loss_fn = dies_at_step_10
    with pytest.raises(KeyboardInterrupt):
        fit(doomed, src, cfg, tmp_path / "split", progress=False)
    assert load_checkpoint(tmp_path / "split")[0]["step"] == 8
    with pytest.raises(CheckpointError, match="--resume"):
        fit(stages.source(backbone, src, teachers, cfg, rank=2), src, cfg, tmp_path / "split", progress=False)
    fit(stages.source(backbone, src, teachers, cfg, rank=2), src, cfg, tmp_path / "split", resume=True, progress=False)
    _, whole = load_checkpoint(tmp_path / "whole")
    _, resumed = load_checkpoint(tmp_path / "split")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, msg=key)


def test_resume_with_other_options_is_refused(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=2)
    fit(stages.prompt_tuning("pt", backbone, src, cfg, PROMPT), src, cfg, tmp_path / "r", progress=False)
    other = config(steps=2, lr_prompt=0.1)
    with pytest.raises(CheckpointError, match="differs"):
        fit(stages.prompt_tuning("pt", backbone, src, other, PROMPT), src, other, tmp_path / "r", resume=True,
            progress=False)


def scripted_validate(plan, scores):
    """A validate that returns the next scripted score and records the tensors it saw."""
    seen = []

    def validate():
        seen.append({k: v.detach().clone() for k, v in plan.tensors().items()})
        return scores[len(seen) - 1]

    return validate, seen


def test_early_stopping_keeps_the_best_scoring_tensors(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=12, eval_every=4)
    plan = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    validate, seen = scripted_validate(plan, [0.5, 0.6, 0.9, 0.7])   # steps 0, 4, 8, 12: step 8 wins
    index = fit(plan, src, cfg, tmp_path / "r", progress=False, validate=validate)
    assert [e["step"] for e in index["best"]["evals"]] == [0, 4, 8, 12]
    assert (index["best"]["step"], index["best"]["score"]) == (8, 0.9)
    saved = load_trained(tmp_path / "r").prompt.tensors()
    torch.testing.assert_close(saved["prompt.shared"], seen[2]["prompt.shared"], rtol=0, atol=0)
    assert not torch.equal(saved["prompt.shared"], seen[3]["prompt.shared"])


def test_early_stopping_keeps_the_initial_prompt_when_training_never_helps(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=8, eval_every=4)
    plan = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    validate, seen = scripted_validate(plan, [0.8, 0.8, 0.1])   # ties keep the earlier tensors
    fit(plan, src, cfg, tmp_path / "r", progress=False, validate=validate)
    torch.testing.assert_close(load_trained(tmp_path / "r").prompt.tensors()["prompt.shared"],
                               seen[0]["prompt.shared"], rtol=0, atol=0)


def test_early_stopping_survives_a_resume(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=12, eval_every=4, checkpoint_every=4)
    scores = [0.1, 0.9, 0.2, 0.3]                                 # the best (step 4) lies before the crash

    whole = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    fit(whole, src, cfg, tmp_path / "whole", progress=False, validate=scripted_validate(whole, scores)[0])
    doomed = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    inner, calls = doomed.loss_fn, {"n": 0}

    def dies_at_step_10(batch, totals):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return inner(batch, totals)

    doomed.loss_fn = dies_at_step_10
    with pytest.raises(KeyboardInterrupt):
        fit(doomed, src, cfg, tmp_path / "split", progress=False, validate=scripted_validate(doomed, scores)[0])
    again = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    fit(again, src, cfg, tmp_path / "split", resume=True, progress=False,
        validate=scripted_validate(again, scores[3:])[0])        # only the step-12 evaluation is left to do
    torch.testing.assert_close(load_trained(tmp_path / "split").prompt.tensors()["prompt.shared"],
                               load_trained(tmp_path / "whole").prompt.tensors()["prompt.shared"], rtol=0, atol=0)
    assert load_checkpoint(tmp_path / "split")[0]["best"]["step"] == 4


def test_patience_stops_early_keeps_the_best_and_a_resume_returns_it(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=40, eval_every=4, patience=2)
    plan = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    validate, seen = scripted_validate(plan, [0.1, 0.5, 0.4, 0.3, 0.9])   # steps 0, 4, 8, 12: two without a new best
    index = fit(plan, src, cfg, tmp_path / "r", progress=False, validate=validate)
    assert index["stopped"] == {"step": 12, "reason": "patience"} and index["step"] == 12 and len(seen) == 4
    torch.testing.assert_close(load_trained(tmp_path / "r").prompt.tensors()["prompt.shared"],
                               seen[1]["prompt.shared"], rtol=0, atol=0)
    again = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    resumed = fit(again, src, cfg, tmp_path / "r", resume=True, progress=False,
                  validate=scripted_validate(again, [])[0])                # a stopped run trains and scores nothing
    assert resumed["step"] == 12 and resumed["stopped"]["reason"] == "patience"


def test_goal_stops_as_soon_as_the_dev_score_reaches_it(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=40, eval_every=4)
    plan = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    validate, _ = scripted_validate(plan, [(-0.5, {"polarity": 0.1}), (-0.1, {"polarity": 0.5}), (0.0, {"polarity": 0.9})])
    index = fit(plan, src, cfg, tmp_path / "r", progress=False, validate=validate, goal=-0.02)
    assert index["stopped"] == {"step": 8, "reason": "goal"}
    assert [e["details"] for e in index["best"]["evals"]] == [{"polarity": 0.1}, {"polarity": 0.5}, {"polarity": 0.9}]


def test_warmup_scales_the_learning_rate_linearly_then_holds_it():
    cfg = TrainConfig(warmup=4)
    assert [cfg.warmup_factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert TrainConfig().warmup_factor(0) == 1.0
    with pytest.raises(ValueError, match="patience needs eval_every"):
        TrainConfig(patience=3)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=-1)


def test_warmup_makes_the_first_steps_smaller(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    moved = {}
    for warmup in (0, 10):
        cfg = config(steps=1, warmup=warmup)
        plan = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
        before = plan.prompt.shared[0].detach().clone()
        fit(plan, src, cfg, tmp_path / f"w{warmup}", progress=False)
        moved[warmup] = float((plan.prompt.shared[0].detach() - before).norm())
    assert moved[10] == pytest.approx(moved[0] / 10, rel=1e-3)


def test_dev_scorer_scores_the_live_prompt(backbone, tmp_path):
    src = encoded(backbone, "polarity")
    cfg = config(steps=4)
    plan = stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
    dev = [synthetic_task("polarity", 40, seed=5)]
    validate = dev_scorer(backbone, plan, dev, max_length=32)   # built before training, read after
    fit(plan, src, cfg, tmp_path / "r", progress=False)
    saved = evaluate_trained(backbone, load_trained(tmp_path / "r"), dev, max_length=32)
    score, per_task = validate()
    assert score == pytest.approx(saved["polarity"]["accuracy"]) and per_task == {"polarity": score}
    with pytest.raises(ValueError, match="polarity"):
        dev_scorer(backbone, plan, [synthetic_task("topic", 8)], max_length=32)


def test_train_config_checks_fields():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr_prompt"):
        TrainConfig(lr_prompt=0)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)
    with pytest.raises(ValueError, match="mode"):
        stages.target(None, [], None, config(), mode="everything")


def test_checkpoints_from_before_new_task_fields_still_resume(llama, tmp_path):
    src = encode_tasks([synthetic_task("polarity", 16)], llama.tokenizer, 32)
    cfg = TrainConfig(steps=4, batch_size=4, max_length=32, checkpoint_every=2)
    fit(stages.prompt_tuning("pt", llama, src, cfg, PROMPT), src, cfg, tmp_path, progress=False)
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    for task in index["tasks"]:
        task.pop("verbalizer_tokens")          # a field added in a later version
    index["step"] = 2
    (tmp_path / "checkpoint.json").write_text(json.dumps(index))
    resumed = fit(stages.prompt_tuning("pt", llama, src, cfg, PROMPT), src, cfg, tmp_path, resume=True, progress=False)
    assert resumed["step"] == 4


def _one_step_update(plan_for, src, precision: str, out) -> torch.Tensor:
    """How far one step at `precision` moves the first shared prompt (flattened), checking that it stays fp32."""
    torch.manual_seed(0)
    cfg = config(steps=1, precision=precision)
    plan = plan_for(cfg)
    before = plan.prompt.shared[0].detach().clone()
    index = fit(plan, src, cfg, out, progress=False)
    assert index["train"]["precision"] == precision
    assert load_trained(out).prompt.shared[0].dtype == torch.float32
    return (plan.prompt.shared[0].detach() - before).flatten()


@pytest.mark.parametrize("stage", ["pt", "source"])
def test_a_bf16_forward_steps_the_prompt_like_fp32(backbone, tmp_path, stage):
    src = encoded(backbone, "polarity", "topic")
    teachers = None
    if stage == "source":
        cfg = config(steps=1)
        fit(stages.prompt_tuning("teachers", backbone, src, cfg, PROMPT), src, cfg, tmp_path / "teachers",
            progress=False)
        teachers = load_trained(tmp_path / "teachers")

    def plan_for(cfg):
        if stage == "pt":
            return stages.prompt_tuning("pt", backbone, src, cfg, PROMPT)
        return stages.source(backbone, src, teachers, cfg, rank=2)

    moved = {p: _one_step_update(plan_for, src, p, tmp_path / p) for p in ("fp32", "bf16")}
    bf16 = config(steps=1, precision="bf16")
    with pytest.raises(CheckpointError, match="'train' differs"):   # a resume keeps the checkpoint's precision
        fit(plan_for(bf16), src, bf16, tmp_path / "fp32", resume=True, progress=False)
    assert float(moved["fp32"].norm()) > 0
    assert not torch.equal(moved["fp32"], moved["bf16"])   # the forward did run in bf16
    assert float(torch.nn.functional.cosine_similarity(moved["fp32"], moved["bf16"], dim=0)) > 0.95


def test_losses_are_fp32_from_bf16_logits():
    student = torch.randn(4, 3).to(torch.bfloat16)
    teacher = torch.randn(4, 3).to(torch.bfloat16)
    assert logits_distillation(student, teacher).dtype == torch.float32
    mask = torch.ones(4, 5, dtype=torch.long)
    hidden = torch.randn(4, 5, 8).to(torch.bfloat16)
    assert hidden_distillation(hidden, hidden + 1, mask).dtype == torch.float32


def test_precision_is_checked_and_auto_follows_the_cpu(monkeypatch):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16")
    with forward_precision("bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with forward_precision("fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert resolve_precision("auto") == expected



def test_the_bf16_forward_computes_attention_in_fp32_and_restores_it():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    reference, _ = original(module, q, k, v, None)
    with forward_precision("bf16"):
        out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, *(t.to(torch.bfloat16) for t in (q, k, v)), None)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    assert out.dtype == torch.bfloat16
    fp32_of_bf16, _ = original(module, *(t.to(torch.bfloat16).float() for t in (q, k, v)), None)
    assert torch.equal(out, fp32_of_bf16.to(torch.bfloat16))   # computed in fp32, rounded once at the end
    assert torch.allclose(out.float(), reference, atol=0.05)
    with pytest.raises(RuntimeError), forward_precision("bf16"):
        raise RuntimeError("a failing forward")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original

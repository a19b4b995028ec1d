"""`mpt-edge train teachers | source | target`: the three MPT stages and the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mpt_edge.atomic import check_writable
from mpt_edge.cli.common import checkpoint_backbone, cli_errors, data_dir, names
from mpt_edge.cli.options import (DEFAULT_BACKBONE, Backbone, BatchSize, CheckpointEvery, Config, DataDir, InitText,
                                  KPerClass, LrFactors, LrHead, LrPrompt, MaxLength, Out, Pooling, Precision,
                                  PromptLength, Quiet, Rank, Resume, Seed, Steps, Tasks, Warmup)

train_app = typer.Typer(help="Train the MPT stages and baselines.", no_args_is_help=True)


def _train_config(precision: str, **options):
    from mpt_edge.precision import resolve_precision
    from mpt_edge.training_loop import TrainConfig

    return TrainConfig(precision=resolve_precision(precision), **options)


def _encode(tasks, backbone, config):
    from mpt_edge.batching import encode_tasks, eos_id

    return encode_tasks(tasks, backbone.tokenizer, config.max_length, eos_id(backbone.model))


def _fit_and_report(plan, encoded, config, out, resume, quiet, validate=None) -> None:
    from mpt_edge import distributed
    from mpt_edge.training_loop import fit

    ranks = distributed.init_from_env()   # under torchrun: join the process group (see "Scaling out")
    try:
        index = fit(plan, encoded, config, out, resume=resume, progress=not quiet, validate=validate)
    finally:
        distributed.leave()               # fit ends on a barrier: every rank is done with the group
    if not ranks.main:
        return
    last = index["history"][-1] if index["history"] else {}
    typer.echo(f"{index['stage']}: {index['step']} steps, final loss {last.get('loss', float('nan')):.4f}, "
               f"{last.get('steps_per_s', 0):.2f} steps/s → {out}")
    if "best" in index:
        evals = ", ".join(f"{e['step']}: {100 * e['score']:.1f}" for e in index["best"]["evals"])
        typer.echo(f"dev accuracy by step ({evals}); kept step {index['best']['step']}")


@train_app.command("teachers")
@cli_errors
def train_teachers(
    tasks: Tasks, out: Out, config: Config = None, backbone: Backbone = DEFAULT_BACKBONE, data: DataDir = None,
    steps: Steps = 200, batch_size: BatchSize = 8, max_length: MaxLength = 128, prompt_length: PromptLength = 100,
    lr_prompt: LrPrompt = 0.03, lr_head: LrHead = 0.1, seed: Seed = 0, k_per_class: KPerClass = None,
    init: Annotated[str, typer.Option(help="Prompt init: vocab (paper), random, text.")] = "vocab",
    init_text: InitText = "",
    checkpoint_every: CheckpointEvery = 50, pooling: Pooling = "mean", precision: Precision = "fp32",
    resume: Resume = False, quiet: Quiet = False,
):
    """Stage 1: vanilla prompt tuning, one teacher prompt per source task.

    Example: mpt-edge train teachers --tasks tweet_sentiment,newsgroups20 --out runs/teachers --steps 100
    """
    check_writable(out, keep=False)
    from mpt_edge import stages
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.prompt import PromptConfig

    cfg = _train_config(steps=steps, batch_size=batch_size, max_length=max_length, lr_prompt=lr_prompt,
                        lr_head=lr_head, seed=seed, checkpoint_every=checkpoint_every, precision=precision)
    prompt_cfg = PromptConfig(length=prompt_length)
    train = load_split(names(tasks), data_dir(data), "train", k_per_class=k_per_class, seed=seed)
    bb = load_backbone(backbone)
    encoded = _encode(train, bb, cfg)
    plan = stages.prompt_tuning("teachers", bb, encoded, cfg, prompt_cfg, init, init_text, pooling=pooling)
    _fit_and_report(plan, encoded, cfg, out, resume, quiet)


@train_app.command("source")
@cli_errors
def train_source(
    teachers: Annotated[Optional[Path], typer.Option(help="Checkpoint folder of `train teachers`.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (with --recipe: the source in shipped format, "
                                                     "default runs/sources/NAME).")] = None,
    config: Config = None,
    recipe: Annotated[Optional[str], typer.Option(help="Build a source from a recipe TOML file (or a shipped "
                                                       "recipe's name): teachers to their dev plateau, then "
                                                       "distillation; rerun the same command to resume.")] = None,
    work: Annotated[Optional[Path], typer.Option(help="--recipe: folder of the stage checkpoints "
                                                      "(default runs/sources/NAME-work).")] = None,
    tasks: Annotated[str, typer.Option(help="Source tasks (default: the teachers).")] = "",
    backbone: Annotated[Optional[str], typer.Option(
        help="Named backbone (smollm2-135m, minilm-l6) or a local HF folder (default: the "
             "teachers').")] = None,
    data: DataDir = None, steps: Steps = 300, batch_size: BatchSize = 8,
    max_length: MaxLength = 128, rank: Rank = 1, lr_prompt: LrPrompt = 0.03, lr_factors: LrFactors = 0.4,  # SOURCE_LR_FACTORS
    lr_head: LrHead = 0.1, seed: Seed = 0, k_per_class: KPerClass = None,
    distill_weight: Annotated[float, typer.Option(help="λ on KL + hidden MSE (paper: 0.9).")] = 0.9,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 1.0,
    max_tasks: Annotated[int, typer.Option(help="κ: each batch draws K ∈ [2, κ] tasks.")] = 4,
    mixing_cap: Annotated[int, typer.Option(help="Examples-proportional mixing cap.")] = 3000,
    shared_init: Annotated[str, typer.Option(help="P* init: teachers (their mean), vocab, random, text.")] = "teachers",
    checkpoint_every: CheckpointEvery = 50, precision: Precision = "fp32", resume: Resume = False, quiet: Quiet = False,
):
    """Stage 2: distil the teachers into one shared prompt P* and per-task factors U, V.

    Example: mpt-edge train source --teachers runs/teachers --out runs/source --steps 200
    Example: mpt-edge train source --recipe smollm2-135m    (stages 1 and 2 from a recipe; resumable)

    With --recipe the same command may run once per core (OMP_NUM_THREADS=1 each): the processes share the
    teachers and the source stage through locks in the work folder.
    """
    from mpt_edge.errors import ConfigError

    if recipe is not None:
        return _source_from_recipe(recipe, out, work, data, quiet)
    if teachers is None or out is None:
        raise ConfigError("give --teachers CHECKPOINT and --out FOLDER, or --recipe FILE (which trains the teachers too)")
    check_writable(out, keep=False)
    from mpt_edge import stages
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.losses import DistillConfig
    from mpt_edge.trained import load_trained

    cfg = _train_config(steps=steps, batch_size=batch_size, max_length=max_length, lr_prompt=lr_prompt,
                        lr_factors=lr_factors, lr_head=lr_head, seed=seed, checkpoint_every=checkpoint_every,
                        max_tasks=max_tasks, mixing_cap=mixing_cap, precision=precision)
    distill = DistillConfig(weight=distill_weight, temperature=temperature)
    teacher_run = load_trained(teachers)
    task_names = names(tasks) or teacher_run.task_names
    train = load_split(task_names, data_dir(data), "train", k_per_class=k_per_class, seed=seed)
    bb = load_backbone(checkpoint_backbone(teacher_run, teachers, backbone))
    teacher_run.check_backbone(bb, teachers)
    encoded = _encode(train, bb, cfg)
    plan = stages.source(bb, encoded, teacher_run, cfg, rank, distill, shared_init,
                         pooling=teacher_run.meta.pooling_or_default)
    _fit_and_report(plan, encoded, cfg, out, resume, quiet)


def _source_from_recipe(recipe: str, out: Optional[Path], work: Optional[Path], data: Optional[Path], quiet: bool):
    from mpt_edge.recipe import RecipeError, read_recipe
    from mpt_edge.shipped import shipped_recipe
    from mpt_edge.source_build import build_source, write_shipped

    path = Path(recipe) if Path(recipe).is_file() else shipped_recipe(recipe)
    if path is None:
        raise RecipeError(f"no recipe {recipe!r}: not a file and not a shipped recipe name")
    plan = read_recipe(path)
    out = out or Path("runs/sources") / plan.name
    work = work or Path("runs/sources") / f"{plan.name}-work"
    for folder in (out, work):
        check_writable(folder, keep=False)
    prov = build_source(plan, work, data_dir(data), progress=not quiet, log=lambda msg: typer.echo(msg, err=True))
    index = write_shipped(out, work, path, prov)
    gaps = ", ".join(f"{k} {100 * v:+.1f}" for k, v in prov["source"]["gap"].items())
    typer.echo(f"source {plan.name}: dev gap to the teachers (points) {gaps}; goal "
               f"{'met' if prov['source']['goal_met'] else 'NOT met'} → {index.parent}")


@train_app.command("target")
@cli_errors
def train_target(
    tasks: Tasks, out: Out, config: Config = None,
    method: Annotated[str, typer.Option(help="mpt (from --source), pt (vanilla), spot (from one source prompt), head (encoder, no prompt).")] = "mpt",
    source: Annotated[Optional[str], typer.Option(help="A shipped source by name (smollm2-135m, minilm-l6), a shipped-format "
                                                       "folder, or a checkpoint of `train source` (mpt) or any prompt checkpoint (spot).")] = None,
    mode: Annotated[str, typer.Option(help="mpt: full (P* per task), factors (P* frozen), group (shared trained P*).")] = "full",
    factor_init: Annotated[str, typer.Option(help="mpt: mean (paper), shared-only, or a source task name.")] = "mean",
    factor_rank: Annotated[Optional[int], typer.Option(
        help="mpt: rank of each task's U V (0 = the source's; default: 2, or the source's if higher, in factors mode, "
             "the source's otherwise); higher adds zero columns to U and random rows to V: the same starting prompt, "
             "more to adapt. A task in factors mode stores 4 (l + d) bytes per rank.", show_default=False)] = None,
    spot_task: Annotated[str, typer.Option(help="spot: the source task whose prompt initialises the target.")] = "",
    backbone: Annotated[Optional[str], typer.Option(
        help="Named backbone (smollm2-135m, minilm-l6) or a local HF folder (default: the "
             f"--source's; without --source {DEFAULT_BACKBONE}).")] = None,
    data: DataDir = None, steps: Annotated[int, typer.Option(
        help="Optimizer steps per task (100: where the learning curves from the shipped sources level off, "
             "docs/results.md).")] = 100, batch_size: BatchSize = 8,
    max_length: MaxLength = 128, prompt_length: PromptLength = 100, lr_prompt: LrPrompt = 0.03,
    lr_factors: Annotated[Optional[float], typer.Option(
        help="mpt: Adafactor relative-step cap of U, V (default: 0.05 in factors mode, 0.015 in full and group; "
             "chosen on dev, docs/results.md).", show_default=False)] = None,
    lr_head: LrHead = 0.1, seed: Seed = 0, k_per_class: KPerClass = None,
    init: Annotated[str, typer.Option(help="pt: prompt init vocab, random, text.")] = "vocab",
    init_text: InitText = "",
    eval_every: Annotated[int, typer.Option(help="Early stopping: score the dev split every N steps (and before "
                                                 "training) and keep the best prompt; 0 = off.")] = 0,
    dev_limit: Annotated[Optional[int], typer.Option(help="Cap on dev examples per task for --eval-every.")] = 200,
    patience: Annotated[int, typer.Option(help="Stop after this many dev evaluations without a new best "
                                               "(needs --eval-every; 0 = spend every step).")] = 0,
    warmup: Warmup = 0, precision: Precision = "fp32",
    checkpoint_every: CheckpointEvery = 50, pooling: Pooling = "mean", resume: Resume = False, quiet: Quiet = False,
):
    """Stage 3: adapt to target tasks (MPT), or train a baseline (pt, spot, head) on them.

    Example: mpt-edge train target --tasks rotten_tomatoes --source runs/source --mode full --out runs/mpt --eval-every 25
    """
    check_writable(out, keep=False)
    from mpt_edge import stages
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.errors import ConfigError
    from mpt_edge.evaluate import dev_scorer
    from mpt_edge.prompt import PromptConfig
    from mpt_edge.shipped import resolve_source
    from mpt_edge.trained import fixed_prompts

    methods = ("mpt", "pt", "spot", "head")
    if method not in methods:
        raise typer.BadParameter(f"--method {method!r} is not one of {', '.join(methods)}")
    if method in ("mpt", "spot") and source is None:
        raise ConfigError(f"--method {method} needs --source CHECKPOINT")
    cfg = _train_config(steps=steps, batch_size=batch_size, max_length=max_length, lr_prompt=lr_prompt,
                        lr_factors=lr_factors, lr_head=lr_head, seed=seed, checkpoint_every=checkpoint_every,
                        eval_every=eval_every, patience=patience, warmup=warmup, precision=precision)
    train = load_split(names(tasks), data_dir(data), "train", k_per_class=k_per_class, seed=seed)
    dev = load_split(names(tasks), data_dir(data), "dev", limit=dev_limit, seed=0) if eval_every else []
    run = resolve_source(source) if method in ("mpt", "spot") else None
    bb = load_backbone(checkpoint_backbone(run, source, backbone) if run is not None else backbone or DEFAULT_BACKBONE)
    if run is not None:
        run.check_backbone(bb, source)
    encoded = _encode(train, bb, cfg)
    if method == "head":
        plan = stages.head_only(bb, encoded, cfg, pooling)
    elif method == "pt":
        plan = stages.prompt_tuning("pt", bb, encoded, cfg, PromptConfig(length=prompt_length), init, init_text,
                                    pooling=pooling)
    elif method == "mpt":
        plan = stages.target(bb, encoded, run, cfg, mode, factor_init, pooling, factor_rank)
    else:
        if not spot_task:
            raise ConfigError(f"--method spot needs --spot-task, one of {', '.join(run.task_names)}")
        initial = fixed_prompts(run)[run.index_of(spot_task)]
        plan = stages.prompt_tuning("spot", bb, encoded, cfg, PromptConfig(length=initial.shape[0]),
                                    initial=initial.expand(len(train), *initial.shape), pooling=pooling)
        plan.meta["spot_task"] = spot_task
    validate = dev_scorer(bb, plan, dev, max_length=cfg.max_length) if eval_every else None
    _fit_and_report(plan, encoded, cfg, out, resume, quiet, validate)

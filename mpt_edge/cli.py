"""The `mpt-edge` command line: parses options, calls the training core, prints results.

Every command takes `--config FILE.toml` whose keys are the command's option names, e.g.
`steps = 100` or `tasks = ["rotten_tomatoes"]`; options given on the command line win.
"""

from __future__ import annotations

import functools
import json
import tomllib
from pathlib import Path
from typing import Annotated, Optional

import typer

from mpt_edge.atomic import check_writable

app = typer.Typer(help="Multitask Prompt Tuning on one frozen backbone.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
train_app = typer.Typer(help="Train the MPT stages and baselines.", no_args_is_help=True)
data_app = typer.Typer(help="Real task data from registry packages.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")


def _load_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    if value is None:
        return value
    try:
        data = tomllib.loads(value.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise typer.BadParameter(f"cannot read {value}: {err}") from None
    known = {p.name for p in ctx.command.params}
    values = {k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {unknown}; allowed: {sorted(known - {'config'})}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


Config = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML file of option values (command-line options win).", callback=_load_config,
    is_eager=True, exists=True, dir_okay=False)]
Backbone = Annotated[str, typer.Option(help="Named backbone (smollm2-135m, minilm-l6) or a local HF folder.")]
Tasks = Annotated[str, typer.Option(help="Comma-separated task names (or task folders).")]
DataDir = Annotated[Optional[Path], typer.Option("--data", help="Folder of task folders (default: cache/data).")]
Out = Annotated[Path, typer.Option(help="Output checkpoint folder.")]
Steps = Annotated[int, typer.Option(help="Optimizer steps (per task when tasks train independently).")]
BatchSize = Annotated[int, typer.Option(help="Examples per step.")]
MaxLength = Annotated[int, typer.Option(help="Input tokens per example (prompt not counted).")]
PromptLength = Annotated[int, typer.Option(help="Prompt vectors l (paper: 100).")]
Rank = Annotated[int, typer.Option(help="Rank r of each task's factor pair (paper: 1).")]
LrPrompt = Annotated[float, typer.Option(help="Adafactor relative-step cap for the prompt P* (paper: 0.3 absolute on T5).")]
LrFactors = Annotated[float, typer.Option(help="Adafactor relative-step cap of U, V (source: 0.4 as in the paper; "
                                                "target: 0.015, see README 'Learning rates').")]
LrHead = Annotated[float, typer.Option(help="Learning rate of encoder heads.")]
Seed = Annotated[int, typer.Option(help="Seed of initialisation and sampling.")]
KPerClass = Annotated[Optional[int], typer.Option(help="Train on k examples per class (few-shot).")]
CheckpointEvery = Annotated[int, typer.Option(help="Steps between checkpoints.")]
Resume = Annotated[bool, typer.Option(help="Continue the checkpoint in --out.")]
Pooling = Annotated[str, typer.Option(help="Encoder pooling: mean or cls.")]
Quiet = Annotated[bool, typer.Option(help="No progress bar.")]
Warmup = Annotated[int, typer.Option(help="Steps over which every learning rate rises linearly to its value (0 = none).")]


def _cli_errors(func):
    """Known errors become one `error: ...` line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from mpt_edge.errors import USER_ERRORS

        try:
            return func(*args, **kwargs)
        except USER_ERRORS as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper


def _names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def _data_dir(data: Optional[Path]) -> Path:
    from mpt_edge.data.fetch import default_data_dir

    return data if data is not None else default_data_dir()


def _train_config(**options):
    from mpt_edge.training_loop import TrainConfig

    return TrainConfig(**options)


def _encode(tasks, backbone, config):
    from mpt_edge.batching import encode_tasks, eos_id

    return encode_tasks(tasks, backbone.tokenizer, config.max_length, eos_id(backbone.model))


def _fit_and_report(plan, encoded, config, out, resume, quiet, validate=None) -> None:
    from mpt_edge import distributed
    from mpt_edge.training_loop import fit

    ranks = distributed.init_from_env()   # under torchrun: join the process group (see "Scaling out")
    index = fit(plan, encoded, config, out, resume=resume, progress=not quiet, validate=validate)
    if not ranks.main:
        return
    last = index["history"][-1] if index["history"] else {}
    typer.echo(f"{index['stage']}: {index['step']} steps, final loss {last.get('loss', float('nan')):.4f}, "
               f"{last.get('steps_per_s', 0):.2f} steps/s → {out}")
    if "best" in index:
        evals = ", ".join(f"{e['step']}: {100 * e['score']:.1f}" for e in index["best"]["evals"])
        typer.echo(f"dev accuracy by step ({evals}); kept step {index['best']['step']}")


@data_app.command("fetch")
@_cli_errors
def data_fetch(
    config: Config = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks (default: all built-in).")] = "",
    out: DataDir = None,
    seed: Annotated[int, typer.Option(help="Split seed.")] = 0,
    max_train: Annotated[Optional[int], typer.Option(help="Cap on train examples per task (stratified).")] = None,
    max_eval: Annotated[Optional[int], typer.Option(help="Cap on dev/test examples per task (stratified).")] = None,
):
    """Download the built-in real tasks and write seeded, stratified, deduplicated splits.

    Example: mpt-edge data fetch --tasks rotten_tomatoes,tweet_sentiment
    """
    folder = check_writable(_data_dir(out), keep=False)
    from mpt_edge.data.fetch import fetch_tasks

    summary = fetch_tasks(folder, _names(tasks) or None, seed=seed, max_train=max_train, max_eval=max_eval,
                          progress=lambda msg: typer.echo(msg, err=True))
    for name, manifest in summary.items():
        counts = manifest.get("counts", {})
        typer.echo(f"{name}: " + ", ".join(f"{k} {v['total']}" for k, v in counts.items()) + f" → {folder / name}")


@train_app.command("teachers")
@_cli_errors
def train_teachers(
    tasks: Tasks, out: Out, config: Config = None, backbone: Backbone = "smollm2-135m", data: DataDir = None,
    steps: Steps = 200, batch_size: BatchSize = 8, max_length: MaxLength = 128, prompt_length: PromptLength = 100,
    lr_prompt: LrPrompt = 0.03, lr_head: LrHead = 0.1, seed: Seed = 0, k_per_class: KPerClass = None,
    init: Annotated[str, typer.Option(help="Prompt init: vocab (paper), random, text.")] = "vocab",
    init_text: Annotated[str, typer.Option(help="Text for --init text.")] = "",
    checkpoint_every: CheckpointEvery = 50, pooling: Pooling = "mean", resume: Resume = False, quiet: Quiet = False,
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
                        lr_head=lr_head, seed=seed, checkpoint_every=checkpoint_every)
    prompt_cfg = PromptConfig(length=prompt_length)
    train = load_split(_names(tasks), _data_dir(data), "train", k_per_class=k_per_class, seed=seed)
    bb = load_backbone(backbone)
    encoded = _encode(train, bb, cfg)
    plan = stages.prompt_tuning("teachers", bb, encoded, cfg, prompt_cfg, init, init_text, pooling=pooling)
    _fit_and_report(plan, encoded, cfg, out, resume, quiet)


@train_app.command("source")
@_cli_errors
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
    backbone: Backbone = "smollm2-135m", data: DataDir = None, steps: Steps = 300, batch_size: BatchSize = 8,
    max_length: MaxLength = 128, rank: Rank = 1, lr_prompt: LrPrompt = 0.03, lr_factors: LrFactors = 0.4,  # SOURCE_LR_FACTORS
    lr_head: LrHead = 0.1, seed: Seed = 0, k_per_class: KPerClass = None,
    distill_weight: Annotated[float, typer.Option(help="λ on KL + hidden MSE (paper: 0.9).")] = 0.9,
    temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 1.0,
    max_tasks: Annotated[int, typer.Option(help="κ: each batch draws K ∈ [2, κ] tasks.")] = 4,
    mixing_cap: Annotated[int, typer.Option(help="Examples-proportional mixing cap.")] = 3000,
    shared_init: Annotated[str, typer.Option(help="P* init: teachers (their mean), vocab, random, text.")] = "teachers",
    checkpoint_every: CheckpointEvery = 50, resume: Resume = False, quiet: Quiet = False,
):
    """Stage 2: distil the teachers into one shared prompt P* and per-task factors U, V.

    Example: mpt-edge train source --teachers runs/teachers --out runs/source --steps 200
    Example: mpt-edge train source --recipe smollm2-135m    (stages 1 and 2 from a recipe; resumable)

    With --recipe the same command may run once per core (OMP_NUM_THREADS=1 each): the processes share the
    teachers and the source stage through locks in the work folder.
    """
    if recipe is not None:
        return _source_from_recipe(recipe, out, work, data, quiet)
    if teachers is None or out is None:
        from mpt_edge.tasks import TaskError

        raise TaskError("give --teachers CHECKPOINT and --out FOLDER, or --recipe FILE (which trains the teachers too)")
    check_writable(out, keep=False)
    from mpt_edge import stages
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.losses import DistillConfig
    from mpt_edge.trained import load_trained

    cfg = _train_config(steps=steps, batch_size=batch_size, max_length=max_length, lr_prompt=lr_prompt,
                        lr_factors=lr_factors, lr_head=lr_head, seed=seed, checkpoint_every=checkpoint_every,
                        max_tasks=max_tasks, mixing_cap=mixing_cap)
    distill = DistillConfig(weight=distill_weight, temperature=temperature)
    teacher_run = load_trained(teachers)
    names = _names(tasks) or teacher_run.task_names
    train = load_split(names, _data_dir(data), "train", k_per_class=k_per_class, seed=seed)
    bb = load_backbone(backbone)
    teacher_run.check_backbone(bb, teachers)
    encoded = _encode(train, bb, cfg)
    plan = stages.source(bb, encoded, teacher_run, cfg, rank, distill, shared_init,
                         pooling=teacher_run.meta.get("pooling") or "mean")
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
    prov = build_source(plan, work, _data_dir(data), progress=not quiet, log=lambda msg: typer.echo(msg, err=True))
    index = write_shipped(out, work, path, prov)
    gaps = ", ".join(f"{k} {100 * v:+.1f}" for k, v in prov["source"]["gap"].items())
    typer.echo(f"source {plan.name}: dev gap to the teachers (points) {gaps}; goal "
               f"{'met' if prov['source']['goal_met'] else 'NOT met'} → {index.parent}")


@train_app.command("target")
@_cli_errors
def train_target(
    tasks: Tasks, out: Out, config: Config = None,
    method: Annotated[str, typer.Option(help="mpt (from --source), pt (vanilla), spot (from one source prompt), head (encoder, no prompt).")] = "mpt",
    source: Annotated[Optional[str], typer.Option(help="A shipped source by name (smollm2-135m, minilm-l6), a shipped-format "
                                                       "folder, or a checkpoint of `train source` (mpt) or any prompt checkpoint (spot).")] = None,
    mode: Annotated[str, typer.Option(help="mpt: full (P* per task), factors (P* frozen), group (shared trained P*).")] = "full",
    factor_init: Annotated[str, typer.Option(help="mpt: mean (paper), shared-only, or a source task name.")] = "mean",
    spot_task: Annotated[str, typer.Option(help="spot: the source task whose prompt initialises the target.")] = "",
    backbone: Backbone = "smollm2-135m", data: DataDir = None, steps: Steps = 200, batch_size: BatchSize = 8,
    max_length: MaxLength = 128, prompt_length: PromptLength = 100, lr_prompt: LrPrompt = 0.03,
    lr_factors: LrFactors = 0.015, lr_head: LrHead = 0.1, seed: Seed = 0, k_per_class: KPerClass = None,
    init: Annotated[str, typer.Option(help="pt: prompt init vocab, random, text.")] = "vocab",
    init_text: Annotated[str, typer.Option(help="Text for --init text.")] = "",
    eval_every: Annotated[int, typer.Option(help="Early stopping: score the dev split every N steps (and before "
                                                 "training) and keep the best prompt; 0 = off.")] = 0,
    dev_limit: Annotated[Optional[int], typer.Option(help="Cap on dev examples per task for --eval-every.")] = 200,
    patience: Annotated[int, typer.Option(help="Stop after this many dev evaluations without a new best "
                                               "(needs --eval-every; 0 = spend every step).")] = 0,
    warmup: Warmup = 0,
    checkpoint_every: CheckpointEvery = 50, pooling: Pooling = "mean", resume: Resume = False, quiet: Quiet = False,
):
    """Stage 3: adapt to target tasks (MPT), or train a baseline (pt, spot, head) on them.

    Example: mpt-edge train target --tasks rotten_tomatoes --source runs/source --mode full --out runs/mpt --eval-every 25
    """
    check_writable(out, keep=False)
    from mpt_edge import stages
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.evaluate import dev_scorer
    from mpt_edge.prompt import PromptConfig
    from mpt_edge.tasks import TaskError
    from mpt_edge.shipped import resolve_source
    from mpt_edge.trained import fixed_prompts

    methods = ("mpt", "pt", "spot", "head")
    if method not in methods:
        raise typer.BadParameter(f"--method {method!r} is not one of {', '.join(methods)}")
    if method in ("mpt", "spot") and source is None:
        raise TaskError(f"--method {method} needs --source CHECKPOINT")
    cfg = _train_config(steps=steps, batch_size=batch_size, max_length=max_length, lr_prompt=lr_prompt,
                        lr_factors=lr_factors, lr_head=lr_head, seed=seed, checkpoint_every=checkpoint_every,
                        eval_every=eval_every, patience=patience, warmup=warmup)
    train = load_split(_names(tasks), _data_dir(data), "train", k_per_class=k_per_class, seed=seed)
    dev = load_split(_names(tasks), _data_dir(data), "dev", limit=dev_limit, seed=0) if eval_every else []
    bb = load_backbone(backbone)
    encoded = _encode(train, bb, cfg)
    if method == "head":
        plan = stages.head_only(bb, encoded, cfg, pooling)
    elif method == "pt":
        plan = stages.prompt_tuning("pt", bb, encoded, cfg, PromptConfig(length=prompt_length), init, init_text,
                                    pooling=pooling)
    else:
        run = resolve_source(source)
        run.check_backbone(bb, source)
        if method == "mpt":
            plan = stages.target(bb, encoded, run, cfg, mode, factor_init, pooling)
        else:
            if not spot_task:
                raise TaskError(f"--method spot needs --spot-task, one of {', '.join(run.task_names)}")
            initial = fixed_prompts(run)[run.index_of(spot_task)]
            plan = stages.prompt_tuning("spot", bb, encoded, cfg, PromptConfig(length=initial.shape[0]),
                                        initial=initial.expand(len(train), *initial.shape), pooling=pooling)
            plan.meta["spot_task"] = spot_task
    validate = dev_scorer(bb, plan, dev, max_length=cfg.max_length) if eval_every else None
    _fit_and_report(plan, encoded, cfg, out, resume, quiet, validate)


@app.command("eval")
@_cli_errors
def evaluate_command(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint folder (omit with --zero-shot).")] = None,
    config: Config = None, tasks: Annotated[str, typer.Option(help="Tasks (default: the checkpoint's).")] = "",
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    backbone: Backbone = "smollm2-135m", data: DataDir = None, max_length: MaxLength = 128,
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per task (seeded).")] = None,
    batch_size: BatchSize = 32, seed: Seed = 0,
    zero_shot: Annotated[bool, typer.Option(help="Causal backbone without a prompt.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Accuracy and macro-F1 per task on a held-out split.

    Example: mpt-edge eval runs/mpt --split test   |   mpt-edge eval --zero-shot --tasks rotten_tomatoes
    """
    from mpt_edge.backbones import load_backbone
    from mpt_edge.datasets import load_split
    from mpt_edge.evaluate import evaluate_trained, evaluate_zero_shot
    from mpt_edge.tasks import TaskError
    from mpt_edge.trained import load_trained

    if (checkpoint is None) == (not zero_shot):
        raise TaskError("give a CHECKPOINT folder, or --zero-shot with --tasks (not both)")
    run = load_trained(checkpoint) if checkpoint is not None else None
    names = _names(tasks) or (run.task_names if run else [])
    for name in names:
        if run is not None:
            run.index_of(name)
    data_split = load_split(names, _data_dir(data), split, limit=limit, seed=seed)
    bb = load_backbone(backbone)
    if run is not None:
        run.check_backbone(bb, checkpoint)
        results = evaluate_trained(bb, run, data_split, max_length=max_length, batch_size=batch_size)
    else:
        results = evaluate_zero_shot(bb, data_split, max_length=max_length, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    typer.echo(f"{'task':<24} {'accuracy':>9} {'macro-F1':>9} {'n':>6}   (generate tasks: exact match, token accuracy)")
    for name, r in results.items():
        second = r["macro_f1"] if "macro_f1" in r else r["token_accuracy"]
        typer.echo(f"{name:<24} {r['accuracy']:>9.4f} {second:>9.4f} {r['n']:>6}")


@app.command("quickstart")
@_cli_errors
def quickstart_command(
    out: Annotated[Path, typer.Option(help="Working folder for checkpoints and results.")] = Path("runs/quickstart"),
    backbone: Backbone = "smollm2-135m",
    steps: Annotated[int, typer.Option(help="Steps per stage and task.")] = 40,
    test_limit: Annotated[int, typer.Option(help="Test examples per task.")] = 300,
    fresh: Annotated[bool, typer.Option(help="Delete earlier quickstart results first.")] = False,
):
    """Target adaptation from the backbone's shipped source prompt on a held-out task (tweet_sentiment),
    compared with zero-shot and vanilla PT, then export and the runtime; without a shipped source, teachers and
    a source are trained first (~10 minutes on 2 CPU cores). Results land in OUT/results.json.

    Example: mpt-edge quickstart
    """
    check_writable(out, keep=False)
    from mpt_edge.quickstart import QuickstartConfig, run_quickstart

    results = run_quickstart(QuickstartConfig(out=out, backbone=backbone, steps=steps, test_limit=test_limit),
                             fresh=fresh, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(results["table"])


from mpt_edge import cli_bundle, cli_peft, cli_serve  # noqa: E402,F401  (register export, run, inspect, import-peft, export-peft, serve)


def main() -> None:  # pragma: no cover
    app()

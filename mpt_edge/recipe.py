"""A source recipe: everything that decides a shipped source prompt, as a TOML file checked on load.

    name = "smollm2-135m"            # the name users pass to `--source`
    backbone = "smollm2-135m"
    sources = ["tweet_sentiment", ...]
    held_out = ["reuters_r8", ...]    # evaluation targets: never sources (checked)
    prompt_length = 100
    [teachers]                        # stage 1, each task until its dev accuracy stops improving
    max_steps = 400
    eval_every = 25
    patience = 3
    [source]                          # stage 2, until every source task is within `gap` of its teacher on dev
    max_steps = 1500
    eval_every = 100
    gap = 0.02
    select = "worst"                  # or "mean": keep / stop on the mean gap over source tasks

Unknown keys are refused, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mpt_edge.errors import RecipeError  # noqa: F401  (defined with the other project errors)
from mpt_edge.losses import DistillConfig
from mpt_edge.prompt import PromptConfig
from mpt_edge.training_loop import SOURCE_LR_FACTORS, TrainConfig


@dataclass(frozen=True)
class StageRecipe:
    """One stage's budget and learning rates; it stops early by dev selection (`patience` evaluations)."""

    max_steps: int = 400          # per task for the teachers stage
    eval_every: int = 25
    patience: int = 3             # evaluations without a new best before the stage stops
    batch_size: int = 8
    lr_prompt: float = TrainConfig.lr_prompt
    lr_factors: float = SOURCE_LR_FACTORS   # teachers train no factors; sources: the paper's 0.4
    lr_head: float = TrainConfig.lr_head
    warmup: int = 0

    def __post_init__(self):
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise RecipeError(f"eval_every must be an integer >= 1 (stages stop by dev selection), got {self.eval_every!r}")
        TrainConfig(**self.train_options(seed=0, max_length=1))   # the same checks as every training run

    def train_options(self, *, seed: int, max_length: int, **extra) -> dict:
        return {"steps": self.max_steps, "batch_size": self.batch_size, "max_length": max_length,
                "lr_prompt": self.lr_prompt, "lr_factors": self.lr_factors, "lr_head": self.lr_head,
                "eval_every": self.eval_every, "patience": self.patience, "warmup": self.warmup, "seed": seed,
                "checkpoint_every": self.eval_every, **extra}


@dataclass(frozen=True)
class SourceStageRecipe(StageRecipe):
    """Stage 2: stops once the source tasks' dev accuracy is within `gap` of their teachers' (or by patience).

    select: "worst" keeps the evaluation with the smallest worst-task gap and stops when every task is within
    `gap`; "mean" keeps the best mean gap and stops when the mean is within `gap`. The worst of S noisy gaps is
    biased low: about −1.5 σ for S = 10 when every true gap is 0, where σ, a paired gap's standard error on 200
    dev examples, is 2–3 points when 10–20% of the answers differ. "mean" selects on a less noisy number; both
    gaps and the every-task criterion are reported either way.
    """

    max_steps: int = 1500
    eval_every: int = 100
    patience: int = 5
    gap: float = 0.02             # accuracy (0-1), i.e. 2 points
    distill_weight: float = DistillConfig.weight
    temperature: float = DistillConfig.temperature
    max_tasks: int = TrainConfig.max_tasks
    mixing_cap: int = TrainConfig.mixing_cap
    select: str = "worst"

    def __post_init__(self):
        super().__post_init__()
        DistillConfig(self.distill_weight, self.temperature)
        if self.select not in ("worst", "mean"):
            raise RecipeError(f"source select must be \"worst\" or \"mean\", got {self.select!r}")
        if not 0 <= self.gap < 1:
            raise RecipeError(f"source gap must be an accuracy difference in [0, 1), got {self.gap!r} (0.02 = 2 points)")

    def train_options(self, *, seed: int, max_length: int, **extra) -> dict:
        return super().train_options(seed=seed, max_length=max_length, max_tasks=self.max_tasks,
                                     mixing_cap=self.mixing_cap, **extra)


@dataclass(frozen=True)
class Recipe:
    name: str
    backbone: str
    sources: tuple[str, ...]
    held_out: tuple[str, ...] = ()
    prompt_length: int = 100
    rank: int = 1
    max_length: int = 64          # input tokens per example
    k_per_class: int | None = 256  # source train examples per class (None: the whole train split)
    dev_limit: int = 100          # dev examples per task for every evaluation
    seed: int = 0
    pooling: str = "mean"         # encoder backbones
    teachers: StageRecipe = field(default_factory=StageRecipe)
    source: SourceStageRecipe = field(default_factory=SourceStageRecipe)

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise RecipeError(f"recipe name {self.name!r} must be a plain name (it names the shipped folder)")
        if len(self.sources) < 2:
            raise RecipeError(f"a source recipe needs at least 2 source tasks, got {list(self.sources)}")
        if len(set(self.sources)) != len(self.sources):
            raise RecipeError(f"source tasks are listed twice: {list(self.sources)}")
        overlap = sorted(set(self.sources) & set(self.held_out))
        if overlap:
            raise RecipeError(f"task(s) {overlap} are both sources and held-out targets; a target must never be a source")
        PromptConfig(self.prompt_length, self.rank)
        for name in ("max_length", "dev_limit"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RecipeError(f"recipe {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.k_per_class is not None and (not isinstance(self.k_per_class, int) or self.k_per_class < 1):
            raise RecipeError(f"recipe k_per_class must be an integer >= 1 or absent, got {self.k_per_class!r}")
        if self.pooling not in ("mean", "cls"):
            raise RecipeError(f"recipe pooling must be mean or cls, got {self.pooling!r}")

    @property
    def prompt(self) -> PromptConfig:
        return PromptConfig(self.prompt_length, self.rank)

    def to_json(self) -> dict:
        return {**asdict(self), "sources": list(self.sources), "held_out": list(self.held_out)}


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    data = dict(data)
    teachers = _build(StageRecipe, data.pop("teachers", {}), f"{where} [teachers]")
    source = _build(SourceStageRecipe, data.pop("source", {}), f"{where} [source]")
    for key in ("sources", "held_out"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    return _build(Recipe, {**data, "teachers": teachers, "source": source}, where)


def read_recipe(path: Path) -> Recipe:
    """Parse and check a recipe TOML file; one clear RecipeError naming the file otherwise."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from None
    return recipe_from_dict(data, str(path))

"""Build a source prompt from a recipe: teachers to their dev plateau, then distillation to within a gap of them.

    build_source(recipe, work)  →  work/teachers/<task>/   one checkpoint per source task (stage 1)
                                   work/source/            the distilled source (stage 2)
                                   work/wall.json          wall seconds per stage, summed over calls

Every stage resumes from its checkpoint, so rerunning the same command after an interruption continues where
it stopped; a finished stage is read back, not retrained. Several processes may run the same build at once
(e.g. one per core): each trains the next teacher no other process has claimed (`mpt_edge.claim`), then all
wait for the rest; one trains the source while the others wait for it. `write_shipped` then writes the result in the shipped
format with its provenance record.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mpt_edge
from mpt_edge import stages
from mpt_edge.atomic import write_text_atomic
from mpt_edge.batching import encode_tasks, eos_id
from mpt_edge.claim import claimed
from mpt_edge.datasets import load_split, task_folder
from mpt_edge.evaluate import dev_scorer
from mpt_edge.losses import DistillConfig
from mpt_edge.recipe import Recipe
from mpt_edge.shipped import RECIPE, combine_teachers, save_source
from mpt_edge.training_loop import TrainConfig, fit
from mpt_edge.trained import Trained, load_trained

Log = Callable[[str], None]


def build_source(recipe: Recipe, work: Path, data_dir: Path, *, progress: bool = True,
                 log: Log = lambda message: None) -> dict:
    """Run (or resume) both stages of `recipe` in `work`; returns the provenance record."""
    from mpt_edge.backbones import load_backbone

    work = Path(work)
    backbone = load_backbone(recipe.backbone)
    train = load_split(recipe.sources, data_dir, "train", k_per_class=recipe.k_per_class, seed=recipe.seed)
    dev = load_split(recipe.sources, data_dir, "dev", limit=recipe.dev_limit, seed=0)
    eos = eos_id(backbone.model)
    config = TrainConfig(**recipe.teachers.train_options(seed=recipe.seed, max_length=recipe.max_length))

    def teacher(pair) -> dict:
        task, dev_task = pair
        folder = work / "teachers" / task.spec.name
        encoded = encode_tasks([task], backbone.tokenizer, config.max_length, eos)
        plan = stages.prompt_tuning("teachers", backbone, encoded, config, recipe.prompt, pooling=recipe.pooling)
        log(f"teacher {task.spec.name}: up to {config.steps} steps, dev every {config.eval_every}, patience {config.patience}")
        with _timed(work, f"teacher:{task.spec.name}"):
            index = fit(plan, encoded, config, folder, resume=True, progress=progress,
                        validate=dev_scorer(backbone, plan, [dev_task], max_length=config.max_length))
        log(f"teacher {task.spec.name}: dev {100 * index['best']['score']:.1f} at step {index['best']['step']} "
            f"({_ended(index)})")
        return index

    teacher_indexes = _shared_pass(work / "teachers", list(zip(train, dev)), lambda pair: pair[0].spec.name,
                                   teacher, log)
    teacher_runs = [load_trained(work / "teachers" / name) for name in recipe.sources]
    teachers = combine_teachers(teacher_runs)
    teacher_dev = {name: index["best"]["score"] for name, index in teacher_indexes.items()}

    stage = recipe.source
    config = TrainConfig(**stage.train_options(seed=recipe.seed, max_length=recipe.max_length))
    encoded = encode_tasks(train, backbone.tokenizer, config.max_length, eos)
    plan = stages.source(backbone, encoded, teachers, config, recipe.rank,
                         DistillConfig(stage.distill_weight, stage.temperature), pooling=recipe.pooling)
    scorer = dev_scorer(backbone, plan, dev, max_length=config.max_length)

    def gap_to_teachers():
        return gap_score(scorer()[1], teacher_dev, stage.select)

    log(f"source: up to {config.steps} steps until the {stage.select} task gap is within {100 * stage.gap:.1f} "
        "points of the teachers")
    with claimed(work / "source.lock", wait=True), _timed(work, "source"):
        index = fit(plan, encoded, config, work / "source", resume=True, progress=progress,
                    validate=gap_to_teachers, goal=-stage.gap)
    log(f"source: {stage.select} gap {100 * index['best']['score']:+.1f} points at step {index['best']['step']} "
        f"({_ended(index)})")
    return provenance(recipe, work, data_dir, teacher_indexes, index)


def gap_score(accuracy: dict[str, float], teacher_dev: dict[str, float], select: str) -> tuple[float, dict]:
    """The source stage's dev score: the worst or the mean of its per-task gaps to the teachers (accuracy −
    teacher accuracy), with the accuracies and gaps as details."""
    gaps = {name: accuracy[name] - teacher_dev[name] for name in accuracy}
    score = min(gaps.values()) if select == "worst" else sum(gaps.values()) / len(gaps)
    return score, {"accuracy": accuracy, "gap": gaps}


def _shared_pass(folder: Path, items: list, name_of: Callable, run: Callable, log: Log) -> dict[str, dict]:
    """run(item) for every item, several processes sharing the work: each claims the next unclaimed item; items
    claimed elsewhere are waited for at the end and then read back (a resumed run that is finished returns at
    once; one whose process died continues here). → {name: run's result} in `items` order."""
    results, elsewhere = {}, []
    for item in items:
        with claimed(folder / f"{name_of(item)}.lock") as mine:
            if mine:
                results[name_of(item)] = run(item)
            else:
                log(f"{name_of(item)} is being trained by another process; moving on")
                elsewhere.append(item)
    for item in elsewhere:
        log(f"waiting for {name_of(item)} (another process)")
        with claimed(folder / f"{name_of(item)}.lock", wait=True):
            results[name_of(item)] = run(item)
    return {name_of(item): results[name_of(item)] for item in items}


def provenance(recipe: Recipe, work: Path, data_dir: Path, teacher_indexes: dict[str, dict], source: dict) -> dict:
    """What produced the source, from the teachers' and the source's checkpoint indexes: recipe, data manifests
    (archive hashes), per-stage steps, dev scores, wall time (from `work`), machine."""
    best = source["best"]
    details = next(e["details"] for e in best["evals"] if e["step"] == best["step"])
    teachers = {name: {"steps": index["step"], "best_step": index["best"]["step"], "ended": _ended(index),
                       "dev_accuracy": round(index["best"]["score"], 4)} for name, index in teacher_indexes.items()}
    return {
        "recipe": recipe.to_json(),
        "split": {"sources": list(recipe.sources), "held_out_targets": list(recipe.held_out),
                  "note": "held-out targets are evaluation tasks and never source tasks"},
        "data": {name: _manifest(task_folder(name, data_dir)) for name in recipe.sources},
        "teachers": teachers,
        "source": {"steps": source["step"], "best_step": best["step"], "ended": _ended(source),
                   "gap_goal": recipe.source.gap, "select": recipe.source.select,
                   "goal_met": best["score"] >= -recipe.source.gap,
                   "every_task_within_gap": min(details["gap"].values()) >= -recipe.source.gap,
                   "worst_gap": round(min(details["gap"].values()), 4),
                   "mean_gap": round(sum(details["gap"].values()) / len(details["gap"]), 4),
                   "dev_accuracy": {k: round(v, 4) for k, v in details["accuracy"].items()},
                   "teacher_dev_accuracy": {k: t["dev_accuracy"] for k, t in teachers.items()},
                   "gap": {k: round(v, 4) for k, v in details["gap"].items()}},
        "wall_seconds": _wall(work),
        "machine": machine(),
        "mpt_edge_version": mpt_edge.__version__,
    }


def write_shipped(out: Path, work: Path, recipe_path: Path, prov: dict) -> Path:
    """The distilled source of `work` in the shipped format at `out`, with its provenance and recipe file."""
    source: Trained = load_trained(work / "source")
    index = save_source(out, source, prov)
    write_text_atomic(Path(out) / RECIPE, Path(recipe_path).read_text())
    return index


def machine() -> dict:
    import torch

    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _ended(index: dict) -> str:
    stopped = index.get("stopped")
    return f"stopped at step {stopped['step']}: {stopped['reason']}" if stopped else f"budget of {index['step']} steps spent"


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        return {"folder": str(folder), "manifest": None, "note": "a local task folder, not fetched by `mpt-edge data fetch`"}
    manifest = json.loads(path.read_text())
    keep = ("package", "version", "members", "archive", "archive_sha256", "seed", "counts")
    return {k: manifest.get(k) for k in keep}


def _wall(work: Path) -> dict[str, float]:
    path = work / "wall.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class _timed:
    """Adds the wall seconds of a stage call to work/wall.json, every `every` seconds while it runs and when it
    returns, so a killed call loses at most its last `every` seconds (a build spans sessions). Processes sharing a
    build each add theirs, so "total" is compute time, not elapsed time."""

    def __init__(self, work: Path, key: str, every: float = 60.0):
        self.work, self.key, self.every = work, key, every
        self.stop = threading.Event()

    def __enter__(self):
        self.counted = time.perf_counter()
        self.ticker = threading.Thread(target=self._tick, daemon=True, name="mpt-edge-wall")
        self.ticker.start()

    def __exit__(self, kind, value, traceback):
        self.stop.set()
        self.ticker.join()
        self._add()
        return False

    def _tick(self) -> None:
        while not self.stop.wait(self.every):
            self._add()

    def _add(self) -> None:
        now = time.perf_counter()
        with claimed(self.work / "wall.lock", wait=True):  # processes sharing the build add their own times
            wall = _wall(self.work)
            wall[self.key] = round(wall.get(self.key, 0.0) + now - self.counted, 1)
            wall["total"] = round(sum(v for k, v in wall.items() if k != "total"), 1)
            write_text_atomic(self.work / "wall.json", json.dumps(wall, indent=2) + "\n")
        self.counted = now

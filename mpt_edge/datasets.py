"""Find task folders by name (fetching the built-in real tasks on first use) and load one split."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mpt_edge.tasks import TaskData, TaskError, few_shot, first_n, load_task


def task_folder(name: str, data_dir: Path) -> Path:
    """`name` as a folder path, else `<data_dir>/<name>`; a built-in task missing there is fetched."""
    as_path = Path(name)
    if as_path.is_dir() and (as_path / "task.json").is_file():
        return as_path
    folder = Path(data_dir) / name
    if (folder / "task.json").is_file():
        return folder
    from mpt_edge.data.fetch import SOURCES, fetch_tasks

    if name in SOURCES:
        print(f"fetching task {name!r} into {data_dir} (one time)", file=sys.stderr)
        fetch_tasks(Path(data_dir), [name])
        return folder
    raise TaskError(
        f"task {name!r} not found: no task.json in {folder} and it is not a folder; built-in tasks: "
        f"{', '.join(sorted(SOURCES))}. Fetch them with `mpt-edge data fetch` or pass a task folder"
    )


def load_split(names: Sequence[str], data_dir: Path, split: str, *, k_per_class: int | None = None,
               limit: int | None = None, seed: int = 0) -> list[TaskData]:
    """Load `split` of each task; optionally k examples per class and/or at most `limit` examples."""
    if not names:
        raise TaskError("no tasks given; pass --tasks NAME[,NAME...]")
    if len(set(names)) != len(names):
        raise TaskError(f"tasks are listed twice: {list(names)}")
    tasks = []
    for name in names:
        task = load_task(task_folder(name, data_dir), split)
        if k_per_class is not None:
            task = few_shot(task, k_per_class, seed)
        if limit is not None:
            task = first_n(task, limit, seed)
        tasks.append(task)
    return tasks

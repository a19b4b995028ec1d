"""The tasks each bundle serves now: its tasks.json changed by the task store. Read by the gateway to route a
request to its bundle and to answer GET /v1/tasks, without loading any model."""

from __future__ import annotations

import json
import os

from mpt_edge_runtime import format as fmt
from mpt_edge_serve.config import BundleRef
from mpt_edge_serve.errors import ApiError
from mpt_edge_serve.store import STATE, StoreState, TaskStore, task_spec


def describe(spec: dict) -> dict:
    return {"kind": spec.get("kind", "classify"), "labels": list(spec.get("labels", []))}


class Catalog:
    def __init__(self, bundles: tuple[BundleRef, ...], store: TaskStore):
        self.bundles = {b.name: b for b in bundles}
        self.store = store
        self._base: dict[str, dict[str, dict]] = {}
        self._states: dict[str, tuple[tuple, StoreState]] = {}
        self._specs: dict[tuple[str, str], dict] = {}

    def tasks(self, bundle: str) -> dict[str, dict]:
        """name → {"kind", "labels"} of every task `bundle` serves now."""
        if bundle not in self._base:
            specs = json.loads((self.bundles[bundle].path / fmt.TASKS).read_text())["tasks"]
            self._base[bundle] = {spec["name"]: describe(spec) for spec in specs}
        base, state = self._base[bundle], self._state(bundle)
        tasks = {name: info for name, info in base.items() if name not in state.removed}
        for name, entry in state.added.items():
            key = (bundle, entry["file"])
            if key not in self._specs:
                self._specs[key] = describe(task_spec(self.store.file(bundle, entry["file"])))
            tasks[name] = self._specs[key]
        return dict(sorted(tasks.items()))

    def locate(self, task: str, bundle: str | None) -> str:
        """The bundle a request for `task` goes to: the one it names, the only one, or the one serving `task`."""
        if bundle is not None:
            if bundle not in self.bundles:
                raise ApiError(404, f"unknown bundle {bundle!r}; this server serves: {', '.join(self.bundles)}")
            return bundle
        if len(self.bundles) == 1:
            return next(iter(self.bundles))
        serving = [name for name in self.bundles if task in self.tasks(name)]
        if len(serving) == 1:
            return serving[0]
        if not serving:
            known = sorted({t for name in self.bundles for t in self.tasks(name)})
            raise ApiError(404, f"unknown task {task!r}; this server serves: {', '.join(known) or '(no tasks)'}")
        raise ApiError(422, f"task {task!r} is in bundles {', '.join(serving)}; say which with \"bundle\"")

    def _state(self, bundle: str) -> StoreState:
        """The store state, re-read only when state.json changed (it is replaced, never edited in place)."""
        try:
            st = os.stat(self.store.folder(bundle) / STATE)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = ()
        cached = self._states.get(bundle)
        if cached is None or cached[0] != stamp:
            cached = (stamp, self.store.state(bundle))
            self._states[bundle] = cached
        return cached[1]

"""A worker replica's work without Ray: bundles, merged runtime calls, task store changes. The Ray deployment
(worker.py) adds the batching queue, replicas and metrics export around it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from mpt_edge_runtime.task_table import read_task_file
from mpt_edge_runtime.errors import BundleError, MptEdgeRuntimeError, UnknownTaskError
from mpt_edge_serve.cache import BundleCache, Loaded
from mpt_edge_serve.calls import ClassifyCall, GenerateCall
from mpt_edge_serve.catalog import describe
from mpt_edge_serve.config import ServeConfig
from mpt_edge_serve.merge import classify_calls, generate_calls
from mpt_edge_serve.metrics import Metrics
from mpt_edge_serve.store import StoreError, TaskStore, task_spec


def _error(status: int, message: str) -> dict:
    return {"error": {"status": status, "message": message}}


class WorkerCore:
    def __init__(self, config: ServeConfig, metrics: Metrics = Metrics(), replica: str = "local"):
        self.config, self.metrics, self.replica = config, metrics, replica
        self.store = TaskStore(config.task_store)
        self.cache = BundleCache(config, self.store, metrics)

    async def bundle(self, name: str) -> tuple[Loaded | None, dict | None]:
        """(the loaded bundle, None) or (None, the error a request for it gets)."""
        if self.config.bundle(name) is None:
            return None, _error(404, f"unknown bundle {name!r}; this server serves: {', '.join(self.config.bundle_names)}")
        try:
            return await self.cache.get(name), None
        except (MptEdgeRuntimeError, StoreError, OSError, MemoryError) as err:
            return None, _error(503, f"bundle {name!r} cannot be loaded on this replica: {err}")

    async def classify(self, calls: Sequence[ClassifyCall]) -> list[dict]:
        """One result per call; the calls of each bundle run as one mixed-task runtime call."""
        results: list[dict | None] = [None] * len(calls)
        for bundle in dict.fromkeys(call.bundle for call in calls):
            members = [i for i, call in enumerate(calls) if call.bundle == bundle]
            loaded, error = await self.bundle(bundle)
            if error is not None:
                for i in members:
                    results[i] = error
                continue
            got, stats = await asyncio.to_thread(classify_calls, loaded.engine, [calls[i] for i in members])
            for batch in stats:
                self.metrics.batch(batch)
            for i, result in zip(members, got):
                results[i] = {**result, "replica": self.replica}
        return results

    async def generate(self, calls: Sequence[GenerateCall]) -> AsyncIterator[list]:
        """Per step, one item per call (see merge.generate_calls); the first piece item names this replica."""
        engines, failed = [], []
        for call in calls:
            loaded, error = await self.bundle(call.bundle)
            engines.append(loaded.engine if loaded else None)
            failed.append(error)
        async for items in generate_calls(engines, calls, self.metrics.batch, failed):
            yield [{**item, "replica": self.replica} if isinstance(item, dict) and ("batch" in item or "error" in item)
                   else item for item in items]

    async def add_task(self, bundle: str, name: str, data: bytes) -> dict:
        """Verify a task file against `bundle`, store it for every replica, and serve it here at once."""
        loaded, error = await self.bundle(bundle)
        if error is not None:
            return error

        def verify(path: Path) -> None:
            try:
                read_task_file(path, loaded.engine.manifest, loaded.engine.groups, name)
            except (BundleError, KeyError, TypeError, ValueError, AttributeError) as err:
                raise BundleError(f"not a task file for bundle {bundle!r}: {type(err).__name__}: {err}") from None

        try:
            state = await asyncio.to_thread(self.store.add, bundle, name, data, verify)
        except BundleError as err:
            return _error(422, str(err).replace(str(self.store.root), "<task store>"))
        except StoreError as err:
            return _error(500, str(err))
        await asyncio.to_thread(self.cache.apply, bundle, loaded, state)
        entry = state.added[name]
        return {"bundle": bundle, "task": name, "version": state.version, "sha256": entry["sha256"],
                **describe(task_spec(self.store.file(bundle, entry["file"])))}

    async def remove_task(self, bundle: str, name: str) -> dict:
        """Stop serving task `name` of `bundle` on every replica (an added task, or one the bundle ships)."""
        loaded, error = await self.bundle(bundle)
        if error is not None:
            return error
        try:
            state = await asyncio.to_thread(self.store.remove, bundle, name, loaded.base)
        except StoreError as err:
            return _error(500, str(err))
        if state is None:
            return _error(404, str(UnknownTaskError(name, loaded.engine.tasks)))
        await asyncio.to_thread(self.cache.apply, bundle, loaded, state)
        return {"bundle": bundle, "task": name, "version": state.version, "removed": True}

    def health(self) -> dict:
        import psutil

        return {"replica": self.replica, "rss_mb": round(psutil.Process().memory_info().rss / 2 ** 20, 1),
                "bundles_loaded": list(self.cache.loaded),
                "resident_mb": round(self.cache.resident / 2 ** 20, 1),
                "task_store_versions": {name: entry.version for name, entry in self.cache.loaded.items()}}

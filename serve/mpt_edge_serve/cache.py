"""The bundles a worker replica holds: loaded on first use, least recently used evicted under a memory bound,
and kept in step with the task store (hot-added and removed tasks).

A bundle counts as the bytes of its files (graph weights, prompts, tokenizer: what onnxruntime holds); the
runtime's working memory (activations, KV caches) comes on top, so leave headroom when setting the bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import mpt_edge_runtime as mer
from mpt_edge_serve.config import ServeConfig
from mpt_edge_serve.metrics import Metrics
from mpt_edge_serve.store import StoreState, TaskStore

log = logging.getLogger("mpt_edge_serve")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


@dataclass
class Loaded:
    engine: mer.Engine
    base: frozenset[str]                                   # the bundle's own tasks
    cost: int                                              # bytes counted against the memory bound: its files'
    applied: dict[str, str] = field(default_factory=dict)  # hot-added task → sha256 of the file it was read from
    version: int = 0                                       # task store version applied
    lock: threading.Lock = field(default_factory=threading.Lock)


class BundleCache:
    def __init__(self, config: ServeConfig, store: TaskStore, metrics: Metrics = Metrics()):
        self.config, self.store, self.metrics = config, store, metrics
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._loading = asyncio.Lock()
        self.budget = int(config.bundle_memory_mb * 2 ** 20)

    @property
    def resident(self) -> int:
        return sum(entry.cost for entry in self.loaded.values())

    async def get(self, bundle: str) -> Loaded:
        """The loaded bundle (loading it, and evicting least recently used ones to make room, if needed)."""
        if bundle in self.loaded:
            self.loaded.move_to_end(bundle)
            return self.loaded[bundle]
        async with self._loading:
            if bundle in self.loaded:
                return self.loaded[bundle]
            ref = self.config.bundle(bundle)
            if ref is None:
                raise KeyError(bundle)
            need = folder_bytes(ref.path)
            while self.loaded and (len(self.loaded) >= self.config.max_bundles or self.resident + need > self.budget):
                name, _ = self.loaded.popitem(last=False)   # in-flight calls keep their engine until they finish
                log.info("evicted bundle %s (least recently used)", name)
                self.metrics.bundle_evicted(name, self.resident)
            entry = await asyncio.to_thread(self._load, bundle, ref.path, need)
            await asyncio.to_thread(self.apply, bundle, entry, self.store.state(bundle))
            self.loaded[bundle] = entry
            return entry

    def _load(self, bundle: str, path: Path, cost: int) -> Loaded:
        tick = time.perf_counter()
        engine = mer.load(path, device=self.config.device, threads=self.config.threads,
                          batch_size=self.config.max_batch_size)
        self.metrics.bundle_loaded(bundle, time.perf_counter() - tick, self.resident + cost)
        log.info("loaded bundle %s from %s in %.2f s (%.0f MB)", bundle, path, time.perf_counter() - tick, cost / 2 ** 20)
        return Loaded(engine, frozenset(engine.tasks), cost)

    def apply(self, bundle: str, entry: Loaded, state: StoreState) -> None:
        """Make `entry` serve what `state` says: add new or changed task files, remove tasks no longer served."""
        with entry.lock:
            if state.version == entry.version:
                return
            for name, added in state.added.items():
                if entry.applied.get(name) != added["sha256"]:
                    entry.engine.add_task(name, self.store.file(bundle, added["file"]))
                    entry.applied[name] = added["sha256"]
            for name in set(entry.engine.tasks) - state.apply(entry.base):
                entry.engine.remove_task(name)
                entry.applied.pop(name, None)
            entry.version = state.version
        self.metrics.store_version(bundle, state.version)

    async def sync(self) -> None:
        """Apply the task store's current state to every loaded bundle."""
        for bundle, entry in list(self.loaded.items()):
            try:
                state = await asyncio.to_thread(self.store.state, bundle)
                if state.version != entry.version:
                    await asyncio.to_thread(self.apply, bundle, entry, state)
            except RuntimeError as err:
                if "shutdown" in str(err):
                    raise
                log.warning("task store sync of bundle %s failed: %s", bundle, err)
            except Exception as err:   # keep serving what is loaded; try again at the next tick
                log.warning("task store sync of bundle %s failed: %s", bundle, err)

    async def sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval_s)
            try:
                await self.sync()
            except RuntimeError as err:   # the replica is shutting down: its thread pool is gone
                if "shutdown" in str(err):
                    return
                raise

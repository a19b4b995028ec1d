"""The worker deployment: a WorkerCore per replica, with Ray Serve's batching queue in front of it.

Concurrent requests to one replica are queued by `@serve.batch` (up to max_batch_size texts, waiting at most
batch_wait_ms for more) and Ray splits each batch by multiplexed model id, which the gateway sets to the
bundle name: so one batch is one bundle's requests, of any of its tasks, and runs as one runtime call.

Ray's batch queue forms the next batch as soon as requests arrive, even while the previous batch still runs;
under load that splits the waiting requests into many small batches that then wait their turn. A gate in
front of the queue holds requests while a batch of their kind runs and lets them in together when it ends,
so they form one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ray import serve

from mpt_edge_serve.calls import ClassifyCall, GenerateCall
from mpt_edge_serve.config import ServeConfig
from mpt_edge_serve.core import WorkerCore
from mpt_edge_serve.merge import FINISHED
from mpt_edge_serve.metrics import RayMetrics

log = logging.getLogger("mpt_edge_serve")


class Gate:
    """Open while no batch runs; requests wait here, not in Ray's queue, while one does."""

    def __init__(self):
        self.open = asyncio.Event()
        self.open.set()
        self.batches = 0   # running now (Ray runs the sub-batches of different bundles side by side)

    @contextlib.asynccontextmanager
    async def running(self):
        self.batches += 1
        self.open.clear()
        try:
            yield
        finally:
            self.batches -= 1
            if not self.batches:
                self.open.set()


def texts_in(calls: list) -> int:
    """A batch's size for Ray's batching queue: its texts (rows), not its requests."""
    return sum(len(call.texts) for call in calls)


@serve.deployment(name="Worker")
class Worker:
    async def __init__(self, config: ServeConfig):
        self.config = config
        self.core = WorkerCore(config, RayMetrics(), replica=serve.get_replica_context().replica_id.unique_id)
        for method in (self._classify_batch, self._generate_batch):
            method.set_max_batch_size(config.max_batch_size)
            method.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        # batching off: one runtime call per request, one at a time per kind (as one batch at a time with batching)
        self._solo = {"classify": asyncio.Semaphore(1), "generate": asyncio.Semaphore(1)}
        self._gates = {"classify": Gate(), "generate": Gate()}
        await self.core.bundle(config.bundles[0].name)   # ready = the first bundle is loaded
        self._sync = asyncio.get_running_loop().create_task(self.core.cache.sync_forever())

    async def classify(self, call: ClassifyCall) -> dict:
        if not self.config.batching:
            async with self._solo["classify"]:
                return (await self.core.classify([call]))[0]
        await self._gates["classify"].open.wait()
        return await self._classify_batch(call)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=texts_in)
    async def _classify_batch(self, calls: list[ClassifyCall]) -> list[dict]:
        async with self._gates["classify"].running():
            return await self.core.classify(calls)

    async def generate(self, call: GenerateCall):
        """Stream the call's items: {"pieces", "batch"?, "replica"?} or {"error"}."""
        if not self.config.batching:
            async with self._solo["generate"]:
                async for items in self.core.generate([call]):
                    if items[0] is FINISHED:
                        return
                    if items[0] is not None:
                        yield items[0]
            return
        await self._gates["generate"].open.wait()
        async for item in self._generate_batch(call):
            if item is not None:
                yield item

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=texts_in)
    async def _generate_batch(self, calls: list[GenerateCall]):
        async with self._gates["generate"].running():
            async for items in self.core.generate(calls):
                yield items

    async def add_task(self, bundle: str, name: str, data: bytes) -> dict:
        return await self.core.add_task(bundle, name, data)

    async def remove_task(self, bundle: str, name: str) -> dict:
        return await self.core.remove_task(bundle, name)

    async def health(self) -> dict:
        return self.core.health()

    async def check_health(self) -> None:
        """Ray's health check: a replica whose task store sync stopped is restarted."""
        if self._sync.done():
            raise RuntimeError(f"the task store sync stopped: {self._sync.exception()!r}")

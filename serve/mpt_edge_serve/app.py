"""Build the Ray Serve application from a ServeConfig, check its bundles, and run it (local Ray or a cluster)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from mpt_edge_runtime.bundle import read_manifest
from mpt_edge_serve.cache import folder_bytes
from mpt_edge_serve.config import ConfigError, ServeConfig


def check_bundles(config: ServeConfig) -> None:
    """Every bundle folder is a bundle whose files verify, and fits the memory bound alone (or ConfigError)."""
    for ref in config.bundles:
        read_manifest(ref.path)   # BundleError names what is wrong
        size = folder_bytes(ref.path)
        if size > config.bundle_memory_mb * 2 ** 20:
            raise ConfigError(f"bundle {ref.name} ({ref.path}) has {size / 2 ** 20:.0f} MB of files, above "
                              f"--bundle-memory-mb {config.bundle_memory_mb:g}; raise it")


# glibc malloc settings of the worker replicas (each overridden by the same variable in the environment): up to 8
# arenas per core, one per thread that allocates, let a replica's request and generation threads each grow their
# own, so 2; and the mmap threshold that glibc raises as large blocks are freed (up to 32 MB) put a generation's
# multi-MB KV buffers on the heap, where they fragment it, so fixed at 1 MiB: they are mapped and given back.
WORKER_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}


def worker_env() -> dict[str, str]:
    """Environment of the worker replicas: WORKER_MALLOC, each value taken from this environment when set."""
    return {name: os.environ.get(name, default) for name, default in WORKER_MALLOC.items()}


def build_app(config: ServeConfig):
    """The application: the gateway deployment (ingress) bound to the worker deployment."""
    from mpt_edge_serve.gateway import Gateway
    from mpt_edge_serve.worker import Worker

    scaling = ({"autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                       "initial_replicas": max(config.min_replicas, 1),
                                       "target_ongoing_requests": config.target_ongoing_requests}}
               if config.min_replicas is not None else {"num_replicas": config.replicas})
    logging_config = {"enable_access_log": config.access_log}
    worker = Worker.options(
        **scaling, max_ongoing_requests=config.max_ongoing_requests, logging_config=logging_config,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus,
                           "runtime_env": {"env_vars": worker_env()}},
        graceful_shutdown_timeout_s=5,
    ).bind(config)
    return Gateway.options(
        num_replicas=config.gateway_replicas, max_ongoing_requests=max(1000, 4 * config.max_ongoing_requests),
        logging_config=logging_config, ray_actor_options={"num_cpus": 0},
    ).bind(config, worker)


# Ray Serve gives its HTTP proxy 3 readiness checks of 5 s before killing it, and `serve.start` waits 60 s;
# the proxy took ~60 s to start on a busy 2-core machine (load 5), so the deploy failed. A local Ray started
# here lets the checks take 30 s each; set the variable yourself to override it (on a cluster: where you start
# Ray), and a slow proxy no longer fails the deploy: Serve keeps starting it and the health check tells when.
SLOW_START = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def deploy(config: ServeConfig, address: str | None = None, metrics_port: int | None = None,
           num_cpus: int | None = None, log: Callable[[str], None] = print) -> bool:
    """Connect to the Ray cluster at `address` (None: start a local Ray instance) and deploy; returns whether
    this call started Ray (and so should shut it down)."""
    import ray
    from ray import serve

    if address is None:
        for name, seconds in SLOW_START.items():  # read by the Serve controller this local Ray starts
            os.environ.setdefault(name, seconds)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
                 log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
    except (TimeoutError, ray.exceptions.ActorDiedError) as err:  # Serve waits 60 s for its proxy, then gives up
        log(f"mpt-edge serve: the HTTP proxy is slow to start ({type(err).__name__}); Serve keeps starting it")
        serve.start(http_options={"host": config.host, "port": config.port})   # joins the running controller
    serve.run(build_app(config), name=config.app_name, route_prefix="/")
    log(f"mpt-edge serve: {len(config.bundles)} bundle(s) at http://{config.host}:{config.port} "
        f"(app {config.app_name!r}, batching {'on' if config.batching else 'off'}, admin API "
        f"{'on' if config.admin_token else 'off'}); Prometheus metrics on each Ray node's metrics port"
        + (f" (this one: http://127.0.0.1:{metrics_port}/metrics)" if address is None and metrics_port else ""))
    return address is None


def serve_until_stopped(config: ServeConfig, address: str | None = None, metrics_port: int | None = None,
                        num_cpus: int | None = None, detach: bool = False, log: Callable[[str], None] = print) -> None:
    """Deploy, then wait for SIGINT / SIGTERM and take the application down (and the local Ray instance, if
    this process started it). With `detach` (a cluster only) the application keeps running after return."""
    import ray
    from ray import serve

    if detach and address is None:
        raise ConfigError("--detach needs --address: a local Ray instance ends with this process")
    stop = threading.Event()
    # While deploying, Ctrl-C interrupts (serve.run waits as long as replicas cannot be placed, e.g. more
    # --replica-cpus than the machine has); the finally below then takes down what was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    deployed = False
    try:
        deploy(config, address, metrics_port, num_cpus, log)
        deployed = True
        if detach:
            log(f"deployed; it runs until: mpt-edge serve-stop --address {address} --app-name {config.app_name}")
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    finally:
        if not (detach and deployed):
            log("mpt-edge serve: stopping")
            try:
                if address is None and ray.is_initialized():   # guarded: serve.shutdown() would start a Ray
                    serve.shutdown()
                elif deployed:
                    serve.delete(config.app_name)
            finally:
                ray.shutdown()


def stop_app(address: str, app_name: str) -> None:
    """Take a deployed application off the cluster at `address`."""
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False)
    try:
        serve.delete(app_name)
    finally:
        ray.shutdown()

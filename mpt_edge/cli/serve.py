"""`mpt-edge serve`: bundles behind an HTTP JSON API on Ray Serve (extra `serve`; no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from mpt_edge.cli.common import cli_errors
from mpt_edge.cli.options import Config, Device

serve_app = typer.Typer()

TOKEN_ENV = "MPT_EDGE_ADMIN_TOKEN"


def _default_store(app_name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mpt-edge" / "serve-tasks" / app_name


def _admin_token(path: Optional[Path]) -> Optional[str]:
    if path is not None:
        return path.read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


def _require_serve() -> None:
    try:
        import fastapi  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as err:
        raise typer.BadParameter(f"mpt-edge serve needs Ray Serve ({err}); install it with: pip install -e \".[serve]\"")


@serve_app.command("serve")
@cli_errors
def serve_command(
    bundles: Annotated[list[str], typer.Argument(help="Bundle folders, as PATH or NAME=PATH (NAME: what requests "
                                                     "give as \"bundle\"; default the folder's name).")],
    config: Config = None,
    host: Annotated[str, typer.Option(help="HTTP address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to deploy to (e.g. ray://head:10001 or auto); "
                                                        "default: start a local Ray instance.")] = None,
    task_store: Annotated[Optional[Path], typer.Option(help="Folder of hot-added task files, read by every worker "
                                                            "replica (on a cluster: one every node mounts). Default: "
                                                            "~/.cache/mpt-edge/serve-tasks/<app-name>.")] = None,
    admin_token_file: Annotated[Optional[Path], typer.Option(help=f"File holding the admin API's bearer token (or set "
                                                                  f"{TOKEN_ENV}); without one the admin API is off.",
                                                             exists=True, dir_okay=False)] = None,
    replicas: Annotated[int, typer.Option(help="Worker replicas (each loads the bundles it serves).")] = 1,
    min_replicas: Annotated[Optional[int], typer.Option(help="Autoscaling: fewest worker replicas (with --max-replicas).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(help="Autoscaling: most worker replicas.")] = None,
    target_ongoing_requests: Annotated[float, typer.Option(help="Autoscaling: requests in flight per replica to aim for.")] = 16.0,
    replica_cpus: Annotated[float, typer.Option(help="Ray CPUs reserved per worker replica.")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="Ray GPUs reserved per worker replica (with --device cuda).")] = 0.0,
    gateway_replicas: Annotated[int, typer.Option(help="HTTP gateway replicas.")] = 1,
    device: Device = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime threads per worker replica (default: onnxruntime's).")] = None,
    batching: Annotated[bool, typer.Option(help="Merge concurrent requests of any tasks of a bundle into one runtime call.")] = True,
    max_batch_size: Annotated[int, typer.Option(help="Texts per merged runtime call.")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch's first request waits for others.")] = 10.0,
    max_ongoing_requests: Annotated[int, typer.Option(help="Requests one worker replica takes at once (the rest queue).")] = 64,
    max_texts: Annotated[int, typer.Option(help="Texts per request.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="The most max_new_tokens a generate request may ask for.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="Largest JSON request body (bigger: 413).")] = 1 << 20,
    max_task_file_bytes: Annotated[int, typer.Option(help="Largest admin task file upload (bigger: 413).")] = 64 << 20,
    bundle_memory_mb: Annotated[float, typer.Option(help="Memory for loaded bundles per worker replica; least recently "
                                                         "used bundles are evicted above it.")] = 4096.0,
    max_bundles: Annotated[int, typer.Option(help="Loaded bundles per worker replica.")] = 8,
    sync_interval_s: Annotated[float, typer.Option(help="How often worker replicas read the task store.")] = 0.5,
    request_timeout_s: Annotated[float, typer.Option(help="Longest wait for a worker's answer (a stream: its next piece).")] = 120.0,
    metrics_port: Annotated[Optional[int], typer.Option(help="Local Ray: the Prometheus metrics port (default: Ray picks).")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(help="Local Ray: CPUs it may use (default: all).")] = None,
    app_name: Annotated[str, typer.Option(help="Ray Serve application name.")] = "mpt-edge",
    access_log: Annotated[bool, typer.Option(help="Log every request in the replicas' logs.")] = False,
    detach: Annotated[bool, typer.Option(help="With --address: deploy and return; the application keeps running.")] = False,
):
    """Serve bundles over HTTP on Ray Serve: cross-task dynamic batching, several bundles, hot task updates.

    Example: mpt-edge serve bundles/mpt bundles/names --port 8000 --admin-token-file admin.token
    """
    _require_serve()
    from mpt_edge_serve.app import check_bundles, serve_until_stopped
    from mpt_edge.errors import ConfigError
    from mpt_edge_serve.config import ServeConfig

    if address is not None and task_store is None:
        raise ConfigError("with --address give --task-store: a folder every node of the cluster mounts, so that "
                          "hot-added tasks reach every worker replica")
    settings = ServeConfig(
        bundles=tuple(bundles), task_store=task_store or _default_store(app_name), host=host, port=port,
        app_name=app_name, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
        gateway_replicas=gateway_replicas, device=device, threads=threads, batching=batching,
        max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_ongoing_requests=max_ongoing_requests,
        max_texts=max_texts, max_new_tokens=max_new_tokens, max_body_bytes=max_body_bytes,
        max_task_file_bytes=max_task_file_bytes, admin_token=_admin_token(admin_token_file),
        bundle_memory_mb=bundle_memory_mb, max_bundles=max_bundles, sync_interval_s=sync_interval_s,
        request_timeout_s=request_timeout_s, access_log=access_log)
    check_bundles(settings)
    settings.task_store.mkdir(parents=True, exist_ok=True)
    serve_until_stopped(settings, address=address, metrics_port=metrics_port, num_cpus=num_cpus, detach=detach,
                        log=lambda msg: typer.echo(msg, err=True))


@serve_app.command("serve-stop")
@cli_errors
def serve_stop_command(
    address: Annotated[str, typer.Option(help="The Ray cluster the application runs on.")],
    app_name: Annotated[str, typer.Option(help="Ray Serve application name.")] = "mpt-edge",
):
    """Take an application deployed with `mpt-edge serve --address ... --detach` off its cluster.

    Example: mpt-edge serve-stop --address ray://head:10001
    """
    _require_serve()
    from mpt_edge_serve.app import stop_app

    stop_app(address, app_name)
    typer.echo(f"stopped {app_name} on {address}")

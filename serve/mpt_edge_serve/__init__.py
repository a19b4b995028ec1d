"""mpt-edge on Ray Serve: many clients, many tasks, one graph per bundle.

    mpt-edge serve bundles/mpt bundles/names --port 8000            # a local Ray instance, this machine
    mpt-edge serve bundles/mpt --address ray://head:10001 --replicas 4   # a Ray cluster

Two deployments: the gateway (HTTP JSON API, auth, limits, metrics; no model) and the worker (bundles
loaded on demand and evicted LRU under a memory bound; concurrent requests of any tasks of one bundle merged
by `@serve.batch` into one mixed-task runtime call). Hot-added task files live in a task store folder that
every worker replica reads. Nothing here imports torch.
"""

from mpt_edge_serve.config import BundleRef, ConfigError, ServeConfig

__all__ = ["BundleRef", "ConfigError", "ServeConfig"]

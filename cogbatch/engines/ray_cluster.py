"""Starting or joining a Ray cluster for one run, and sizing its actor pool.

Sharp edges of Ray Data 2.60 handled here: actors reserving every CPU deadlock Ray's own tasks (one CPU
stays free), and an actor larger than every node waits forever (an actor never asks for more CPUs than
the largest node has). No traffic off the machine for a local cluster (the default when RAY_ADDRESS is
unset): usage stats off, a loopback-only single-node cluster, and no API-server process (in Ray 2.60 it
probes cloud metadata endpoints even with usage stats off and no dashboard). Ray is imported here only
when a run asks for it; the base install stays free of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from cogbatch.errors import EngineError
from cogbatch.job.config import JobConfig

INSTALL_HINT = "the Ray engine needs the ray extra: pip install 'cogbatch[ray]'"

# Set (unless already set) before Ray is imported when cogbatch starts a local cluster. Child processes
# of `ray.init` inherit them. The README lists them for users who start air-gapped clusters themselves.
LOCAL_CLUSTER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report, no "disabled" report either
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single node on 127.0.0.1: no 8.8.8.8 probe for the node IP
}
# The object store holds only image paths and status tables (image bytes stay in the manifest).
_LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# How long every actor may take to start and load its model (a first run may download and quantize it).
_ACTOR_START_TIMEOUT_S = 3600
# Deaths over an actor's whole life before Ray stops restarting it (the run then fails, resumable).
MAX_ACTOR_RESTARTS = 10


def plan_actors(cfg: JobConfig, nodes: list[dict[str, float]], workers: int | None) -> tuple[int, dict[str, Any]]:
    """(number of actors, Ray resources of each) for a cluster whose nodes have these resources.

    One GPU per actor; or CPU actors that share the cluster's CPUs but one. Ray Data's own tasks
    need a CPU: actors that reserve every CPU wait for each other forever (ray-project/ray#44687).
    An actor asks for no more CPUs than one node has (else it waits for a node that does not
    exist), and the actors must fit on the nodes as they are. Asking for more GPUs than exist
    silently shrinks the pool. What cannot work is refused here, with the numbers.
    """
    node_cpus = [int(n.get("CPU", 0)) for n in nodes]
    cpus = sum(node_cpus)
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    if cfg.device.startswith("cuda") and gpus == 0:
        raise EngineError(f"the job asks for device {cfg.device!r} but the Ray cluster has no GPUs")
    if cfg.device != "cpu" and gpus > 0:
        n = workers or gpus
        if n > gpus:
            raise EngineError(f"--workers {n} needs {n} GPUs (one per actor) but the Ray cluster has {gpus}")
        if n >= cpus:
            raise EngineError(f"{n} GPU actors take a CPU each and the Ray cluster has {cpus}: one must stay free")
        return n, {"num_gpus": 1}
    n = workers or max(1, min(2, cpus - 1))
    if n > cpus - 1:
        raise EngineError(
            f"--workers {n} CPU actors need {n + 1} CPUs (one stays free for Ray's own tasks) "
            f"but the Ray cluster has {cpus}"
        )
    per = min((cpus - 1) // n, max(node_cpus))
    while per > 1 and sum(c // per for c in node_cpus) < n:  # n actors of `per` CPUs must fit on the nodes
        per -= 1
    return n, {"num_cpus": per}


def init_cluster(ray, address: str | None, cfg: JobConfig, workers: int | None) -> None:
    """Join RAY_ADDRESS, or start a loopback-only local cluster with a CPU to spare for Ray's tasks."""
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = workers or max(2, _local_gpus(cfg))
    with _without_api_server():
        ray.init(
            num_cpus=max(cores, want + 1),  # logical CPUs: the actors' threads plus one for Ray Data's tasks
            include_dashboard=False,
            object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
            logging_level=logging.WARNING,
        )


def _local_gpus(cfg: JobConfig) -> int:
    if cfg.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


@contextlib.contextmanager
def _without_api_server() -> Iterator[None]:
    """While a local cluster starts: no API-server process and 127.0.0.1 as the node's address.

    With `include_dashboard=False`, Ray 2.60 still starts its API server to run one module, usage
    stats, which asks cloud metadata endpoints (169.254.169.254, metadata.google.internal) for the
    provider before it looks at RAY_USAGE_STATS_ENABLED; no setting turns that off. A local cluster
    for one run needs no API server (no dashboard, no job submission), so it is not started. The
    node-address flag repeats RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for a process that imported Ray
    before cogbatch could set it. Both are private names of the pinned Ray minor; if they move, the
    cluster still starts, only with Ray's probes.
    """
    try:
        from ray._private import ray_constants, services
    except ImportError:
        yield
        return
    saved_start = getattr(services, "start_api_server", None)
    saved_cluster = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved_start is not None:
        services.start_api_server = _no_api_server
    if saved_cluster is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_start is not None:
            services.start_api_server = saved_start
        if saved_cluster is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_cluster


def _no_api_server(*args: Any, **kwargs: Any) -> tuple[str, None]:
    return "", None  # (dashboard url, process info) of a node without an API server


@contextlib.contextmanager
def data_context(ray, quiet: bool) -> Iterator[None]:
    """Ray Data settings for one run, restored afterwards (a notebook keeps its own).

    Our progress instead of Ray Data's bars and banners. Work starts once every actor has loaded its
    model: otherwise the first actor ready takes batches while the others load (a short run may never
    use them), and an actor Ray cannot place would silently shrink the pool instead of failing.
    """
    ctx = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, "print_on_execution_start": False,
                "wait_for_min_actors_s": _ACTOR_START_TIMEOUT_S}  # fmt: skip
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    wanted = {"ray": logging.WARNING, "ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    loggers = {logging.getLogger(name): logging.ERROR if quiet else level for name, level in wanted.items()}
    levels = {lg: lg.level for lg in loggers}
    for lg, level in loggers.items():
        lg.setLevel(level)  # the progress module only says that its bars are off, which is what we asked
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        for lg, level in levels.items():
            lg.setLevel(level)


def check_ray_installed() -> None:
    """Fail fast and cheaply (no import: `import ray.data` takes seconds) when the extra is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken install, or `ray` blocked in sys.modules
        found = False
    if not found:
        raise EngineError(INSTALL_HINT)


def import_ray(local: bool):
    """`ray`, with the loopback-only environment for a local cluster set first; a clean error if missing."""
    if local:
        for key, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
        import ray.data  # the extra is ray[data]: fail here, not half way through a run
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return ray

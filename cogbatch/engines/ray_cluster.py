"""Starting or joining a Ray cluster for one run, sizing its actor pool, and keeping Ray quiet.

Sharp edges of Ray Data 2.60 handled here: actors reserving every CPU deadlock Ray's own tasks (one CPU
stays free), and an actor larger than every node waits forever (an actor never asks for more CPUs than
the largest node has). No traffic off the machine for a local cluster (the default when RAY_ADDRESS is
unset): usage stats off, a loopback-only single-node cluster, and no API-server process (in Ray 2.60 it
probes cloud metadata endpoints even with usage stats off and no dashboard). Ray is imported here only
when a run asks for it; the base install stays free of it.

Quiet unless `--verbose`: Ray's Python loggers at ERROR, its Python warnings ignored, the records of
its C++ logger on the driver's stderr dropped (`without_ray_records`), no colour codes when stderr is
no terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from cogbatch.engines.progress import is_terminal
from cogbatch.errors import EngineError
from cogbatch.job.config import JobConfig

INSTALL_HINT = "the Ray engine needs the ray extra: pip install 'cogbatch[ray]'"

# Set (unless already set) before Ray is imported when cogbatch starts a local cluster. Child processes
# of `ray.init` inherit them. The README lists them for users who start air-gapped clusters themselves.
LOCAL_CLUSTER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report, no "disabled" report either
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single node on 127.0.0.1: no 8.8.8.8 probe for the node IP
    "RAY_AUTH_MODE": "token",  # Ray 2.60's default for a new local cluster, chosen explicitly: no warning about it
}
# A record of Ray's C++ logger as the driver writes it to stderr, e.g.
# `[2026-01-02 03:04:05,678 E 4242 4242] core_worker.cc:2465: Actor with class name: ...`
_RAY_RECORD = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEF] \d+ \d+\] [^\n]*(\n|$)", re.MULTILINE)
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


def init_cluster(ray, address: str | None, cfg: JobConfig, workers: int | None, verbose: bool = False) -> None:
    """Join RAY_ADDRESS, or start a loopback-only local cluster with a CPU to spare for Ray's tasks."""
    level = logging.INFO if verbose else logging.ERROR
    if address is not None:
        ray.init(address=address, logging_level=level)
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    want = workers or max(2, _local_gpus(cfg))
    with _without_api_server():
        ray.init(
            num_cpus=max(cores, want + 1),  # logical CPUs: the actors' threads plus one for Ray Data's tasks
            include_dashboard=False,
            object_store_memory=_LOCAL_OBJECT_STORE_BYTES,
            logging_level=level,
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
def data_context(ray, verbose: bool = False) -> Iterator[None]:
    """Ray Data settings for one run, restored afterwards (a notebook keeps its own).

    Our progress instead of Ray Data's bars and banners, and Ray's loggers at ERROR (INFO with
    `verbose`). Work starts once every actor has loaded its model: otherwise the first actor ready
    takes batches while the others load (a short run may never use them), and an actor Ray cannot
    place would silently shrink the pool instead of failing.
    """
    ctx = ray.data.DataContext.get_current()
    settings = {"enable_progress_bars": False, "print_on_execution_start": False,
                "wait_for_min_actors_s": _ACTOR_START_TIMEOUT_S}  # fmt: skip
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    level = logging.INFO if verbose else logging.ERROR
    # the progress module only says that its bars are off, which is what we asked
    wanted = {"ray": level, "ray.data": level, "ray.data._internal.progress": max(level, logging.ERROR)}
    loggers = {logging.getLogger(name): level for name, level in wanted.items()}
    levels = {lg: lg.level for lg in loggers}
    for lg, level in loggers.items():
        lg.setLevel(level)
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


def import_ray(local: bool, verbose: bool = False):
    """`ray`, with the loopback-only environment for a local cluster set first; a clean error if missing."""
    env = dict(LOCAL_CLUSTER_ENV) if local else {}
    if not is_terminal(sys.stderr):
        env["RAY_COLOR_PREFIX"] = "0"  # the driver prints its actors' lines without colour codes
    if not verbose:
        # The actors give a warning once per run themselves (`ray_actor.OncePerRun`); Ray's own merging
        # adds a green "[repeated Nx across cluster]" line and a tip about itself.
        env["RAY_DEDUP_LOGS"] = "0"
    for key, value in env.items():
        os.environ.setdefault(key, value)
    try:
        import ray
        import ray.data  # the extra is ray[data]: fail here, not half way through a run
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return ray


def quiet_ray_warnings() -> None:
    """Ray's Python warnings (deprecations, tips) off: in the driver for a run, in the actors for their life.

    Call it inside `warnings.catch_warnings()` where the filters must not outlive the run (a notebook).
    """
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*\bRay\b")  # raised at a caller's line


@contextlib.contextmanager
def without_ray_records(enabled: bool = True) -> Iterator[None]:
    """While Ray runs in this process, the records of Ray's C++ logger on stderr are dropped; all else passes.

    The driver's core worker writes its records of level ERROR and above straight to file descriptor 2,
    and no Ray setting moves them (`RAY_BACKEND_LOG_LEVEL` also makes every Ray process announce the
    level it read). In Ray 2.60 every Ray Data actor pool makes one: "Actor ... has constructor
    arguments in the object store and max_restarts > 0" (ray-project/ray#57733), because Ray Data
    passes each actor its DataContext and its function as object-store references and enables
    restarts. It warns of a restart after those objects were lost with a node; the driver owns them
    for the whole run, and a lost node fails the run (resumable) anyway. Ray's failures reach the run
    as exceptions, not as these records; `--verbose` shows them.

    Descriptor 2 becomes a pipe that a thread copies to the real stderr without those records (Ray
    writes each record whole, in one write); Python's own writes take the same way, in order.
    """
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 to redirect (an embedding host)
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    stop = threading.Event()
    thread = threading.Thread(target=_copy_without_records, args=(read_end, real, stop), daemon=True,
                              name="cogbatch-ray-stderr")  # fmt: skip
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last write end closes: the thread drains it and ends
        stop.set()
        thread.join(timeout=5)
        os.close(real)
        if not thread.is_alive():
            os.close(read_end)


def _copy_without_records(read_fd: int, out_fd: int, stop: threading.Event) -> None:
    """Copy `read_fd` to `out_fd` without Ray's records until EOF, or until `stop` and nothing left to read.

    Never stops reading on an error: a writer to a full pipe nobody reads would hang the run.
    """
    while True:
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        if not ready:
            if stop.is_set():
                return
            continue
        try:
            data = os.read(read_fd, 1 << 16)
        except OSError:
            return
        if not data:
            return
        data = _RAY_RECORD.sub(b"", data)
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(out_fd, data) :]

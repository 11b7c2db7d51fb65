"""The same job on Ray Data: one model per actor, one GPU per actor, the local engine's per-batch code.

    summary = run_ray(cfg, RunOptions(), workers=4)      # `cogbatch run JOB.yaml --engine ray --workers 4`

What differs from `cogbatch.runner.run` is only scheduling. Pending work comes from the same
`plan_run` (so resume and incremental runs behave identically); it becomes a Ray Dataset with one
row per image (its requests grouped, so an image is decoded once); `map_batches` sends batches of
images to a fixed pool of `CaptionActor`s, each of which loads the model once, decodes with
`load_entry`, calls `Worker.process` and writes the rows itself as one complete part file per batch
(`part-<run_id>-a<actor>-NNNNN.parquet`, atomic like every part). The driver only reads the small
status tables the actors return: progress, counts, and each batch's `Worker.stats`, merged into the
local engine's summary keys.

Exactly once on Ray: a batch's rows reach the output only by the atomic rename of its part, so a
killed driver or actor loses at most the batches in flight. Ray restarts a dead actor and retries
its batch; a batch that had written its part before its actor died would then be generated twice, so
before generating, each actor skips requests that a part of this run already holds. Retries are
bounded: a batch whose actor died `MAX_BATCH_CRASHES` times becomes error rows (Ray Data's default
is to retry forever), and an actor is restarted at most `MAX_ACTOR_RESTARTS` times.

Sharp edges of Ray Data 2.60 handled here (see shared/RAY_NOTES.md): actors reserving every CPU
deadlock Ray's own tasks (one CPU stays free), and an actor larger than every node waits forever (an
actor never asks for more CPUs than the largest node has); a small manifest in one block would feed
one actor (blocks of one batch each); `max_errored_blocks` drops whole blocks (errors are rows, never
exceptions); all-null columns get type null (the status table has an explicit schema).

No traffic off the machine for a local cluster (the default when RAY_ADDRESS is unset): usage stats
off, a loopback-only single-node cluster (no node-IP probe of a public DNS server, no traffic on the
machine's external address), and no API-server process (in Ray 2.60 it probes cloud metadata,
169.254.169.254 and metadata.google.internal, even with usage stats off and no dashboard).

Ray is imported inside `run_ray` only; the base install stays free of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.config import JobConfig
from cogbatch.errors import EngineError, Interrupted, RayRunFailed, UserError
from cogbatch.manifest import ImageEntry, ManifestBytes, Request
from cogbatch.runner import (
    RunOptions,
    _Progress,
    _StopFlag,
    _stopped_before_work,
    check_output,
    finish_summary,
    new_run_id,
    plan_run,
)
from cogbatch.store import PartWriter
from cogbatch.worker import Worker, error_row, load_entry

log = logging.getLogger("cogbatch")

INSTALL_HINT = "the Ray engine needs the ray extra: pip install 'cogbatch[ray]'"

# Set (unless already set) before Ray is imported when cogbatch starts a local cluster. Child processes
# of `ray.init` inherit them. The README lists them for users who start air-gapped clusters themselves.
LOCAL_CLUSTER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report, no "disabled" report either
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single node on 127.0.0.1: no 8.8.8.8 probe for the node IP
}
# The object store holds only image paths and status tables (image bytes stay in the manifest).
_LOCAL_OBJECT_STORE_BYTES = 512 * 2**20
# A manifest becomes at most this many blocks; below it every block is one actor batch, so a small
# manifest is spread over all actors and a retry redoes one batch.
_MAX_BLOCKS = 2048
# How long every actor may take to start and load its model (a first run may download and quantize it).
_ACTOR_START_TIMEOUT_S = 3600
# A batch whose actor died this many times (a segfault on one image, the OOM killer) is not tried again:
# its requests become error rows. Also Ray's `max_task_retries`, so Ray gives up no sooner than we do.
MAX_BATCH_CRASHES = 3
# Deaths over an actor's whole life before Ray stops restarting it (the run then fails, resumable).
MAX_ACTOR_RESTARTS = 10
# Test-only fault injection, like store.CRASH_ENV; never set them in use. CRASH_ONCE: the first actor
# that finishes writing a part while this names a file it can create SIGKILLs itself, as an
# out-of-memory kill would. CRASH_ON: an actor SIGKILLs itself, every time, before generating a batch
# that holds an image of this file name (a decoder that segfaults on one image).
CRASH_ONCE_ENV = "COGBATCH_RAY_CRASH_ONCE"
CRASH_ON_ENV = "COGBATCH_RAY_CRASH_ON"

# One row per image: its requests grouped, so that an actor decodes the image once for all its tasks.
INPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),  # what result rows show
        ("file", pa.string()),  # where to read the bytes, or null for manifest bytes
        ("row", pa.int64()),  # manifest row holding inline bytes, or null
        ("tasks", pa.list_(pa.string())),
        ("prompts", pa.list_(pa.string())),
        ("fingerprints", pa.list_(pa.string())),
    ]
)
# What an actor returns per batch: one row per request, for the driver's progress and summary.
STATUS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),  # "ok" | "error"
        ("tokens_out", pa.int64()),
        ("part", pa.string()),  # the part file that holds the row
        ("again", pa.bool_()),  # the row was already in a part of this run (written by an actor that died)
        ("model_load", pa.string()),  # JSON load report, on the first row an actor returns; else null
        ("stats", pa.string()),  # JSON, on a batch's first row: what it added to Worker.stats (_stats_report)
    ]
)
# Summary ratios of `Worker.summary_stats` and the counters they divide; merged, they are recomputed.
_RATIOS = {
    "mean_batch_size": ("decode_rows", "decode_steps", 2),
    "padding_fraction": ("prefill_padding", "prefill_tokens", 4),
}


# -- the actor -----------------------------------------------------------------------------------


class CaptionActor:
    """One model per actor; `__call__` is one batch of images through `Worker.process` into one part file."""

    def __init__(self, cfg: JobConfig, run_id: str, cwd: str, holder: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # relative model / tokenizer paths mean what they meant on the driver
            os.chdir(cwd)
        self.cfg = cfg
        self.holder = holder  # the driver's entry in the output's run lock
        t0 = time.perf_counter()
        self.worker = Worker(cfg, run_id)  # rows carry the run's id; the part names carry the actor's
        self.load_s = round(time.perf_counter() - t0, 3)  # the summary's model_load_s, as locally
        self.writer_id = f"{run_id}-a{uuid.uuid4().hex[:8]}"  # new per actor start: a restart never collides
        self.writer = PartWriter(cfg.output, self.writer_id, flush_rows=2**62, flush_seconds=math.inf)
        self.inline = ManifestBytes(cfg.input.manifest, cfg.input.bytes_column) if cfg.input.bytes_column else None
        self.tasks = {t.name: t for t in cfg.tasks}
        self.pool = ThreadPoolExecutor(cfg.loader_threads, thread_name_prefix="cogbatch-load")
        self.attempts = BatchAttempts(attempts_dir(cfg.output, run_id))
        self.run_prefix = f"part-{run_id}-a"
        self.seen_parts: set[str] = set()
        self.in_output: dict[tuple[str, str], tuple[str, int, str]] = {}  # key -> (status, tokens_out, part)
        self.load_reported = False
        self.reported_stats: dict[str, float] = dict(self.worker.stats)
        self.batches_done = 0

    def _scan_run_parts(self) -> None:
        """Learn the rows of parts that this run's actors wrote since the last look (each part read once)."""
        for name in os.listdir(self.cfg.output):
            if not name.startswith(self.run_prefix) or not name.endswith(".parquet") or name in self.seen_parts:
                continue
            try:
                t = pq.read_table(self.cfg.output / name, columns=["image_id", "task", "status", "tokens_out"])
            except FileNotFoundError:  # compacted away meanwhile
                continue
            self.seen_parts.add(name)
            cols = t.to_pydict()
            for i, (image_id, task) in enumerate(zip(cols["image_id"], cols["task"], strict=True)):
                self.in_output[(image_id, task)] = (cols["status"][i], cols["tokens_out"][i] or 0, name)

    def _split(self, batch: pa.Table) -> tuple[list[tuple[ImageEntry, list[Request]]], list[tuple[str, str]]]:
        """(images with the requests still to generate, keys that a part of this run already holds)."""
        todo: list[tuple[ImageEntry, list[Request]]] = []
        again: list[tuple[str, str]] = []
        for rec in batch.to_pylist():
            file = rec["file"]
            entry = ImageEntry(rec["image_id"], rec["path"], file=Path(file) if file else None, row=rec["row"])
            requests = []
            for task, prompt, fingerprint in zip(rec["tasks"], rec["prompts"], rec["fingerprints"], strict=True):
                if (entry.image_id, task) in self.in_output:
                    again.append((entry.image_id, task))
                else:
                    requests.append(Request(entry, self.tasks[task], prompt, fingerprint))
            if requests:
                todo.append((entry, requests))
        return todo, again

    def _rows(self, todo: list[tuple[ImageEntry, list[Request]]], key: str) -> list[dict]:
        """Result rows of the batch; error rows when it already killed its actor MAX_BATCH_CRASHES times."""
        crashes = self.attempts.crashes(key)
        if crashes >= MAX_BATCH_CRASHES:
            reason = (
                f"the Ray actor died {crashes} times while this batch of {len(todo)} image(s) was processed "
                "(a crash in decoding or generation, or the out-of-memory killer): not generated"
            )
            log.error("ray: %s", reason)
            return [error_row(r, reason, self.cfg, self.worker.run_id) for _, reqs in todo for r in reqs]
        self.attempts.start(key)
        _crash_on_if_armed(todo)
        rows: list[dict] = []
        step = self.worker.chunk_images  # what the memory plan allows per call, as in the local engine
        size = self.worker.image_size
        for i in range(0, len(todo), step):
            part_of = todo[i : i + step]
            images = self.pool.map(lambda e: load_entry(e, self.cfg, size, self.inline), [e for e, _ in part_of])
            rows += self.worker.process([(img, reqs) for img, (_, reqs) in zip(images, part_of, strict=True)])
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A retried batch whose part was written before its actor died: never generate those rows twice.
        self._scan_run_parts()
        todo, again = self._split(batch)
        key = batch_key(todo)
        rows = self._rows(todo, key) if todo else []
        part = None
        if rows:
            for row in rows:
                self.writer.add(row)
            # One complete part per batch: the unit that a crash can lose. The lock is checked after the
            # part is fsynced, right before it is renamed into the output.
            part = self.writer.flush(before_rename=self._check_driver)
        if part is not None:
            self.seen_parts.add(part.name)
            for row in rows:
                self.in_output[(row["image_id"], row["task"])] = (row["status"], row["tokens_out"] or 0, part.name)
        if todo:
            self.attempts.finished(key)
        if part is not None:
            _crash_once_if_armed()
        return self._status(rows, part, again)

    def _check_driver(self) -> None:
        if not _lock_held_by(self.cfg.output, self.holder):
            # The driver died (kill -9) and this actor outlived it for a moment (Ray ends orphaned workers
            # within seconds): a re-run may already have planned from the parts on disk, and a late part
            # would duplicate its rows.
            raise RuntimeError(f"the driver of run {self.worker.run_id} is gone: batch not written")

    def _status(self, rows: list[dict], part: Path | None, again: list[tuple[str, str]]) -> pa.Table:
        status: dict[str, list] = {name: [] for name in STATUS_SCHEMA.names}
        for row in rows:
            _status_row(status, row["image_id"], row["task"], row["status"], row["tokens_out"] or 0, part.name, False)
        for key in again:
            _status_row(status, *key, *self.in_output[key], True)
        if status["image_id"]:
            if not self.load_reported:
                report = {**self.worker.load_report(), "model_load_s": self.load_s}
                status["model_load"][0] = json.dumps(report, default=str)
                self.load_reported = True
            status["stats"][0] = json.dumps(self._stats_report(), default=str)
        return pa.table(status, schema=STATUS_SCHEMA)

    def _stats_report(self) -> dict[str, Any]:
        """What this batch added to the worker's counters, and the actor's summary so far (for its settings)."""
        now = dict(self.worker.stats)
        added = {k: v - self.reported_stats.get(k, 0) for k, v in now.items() if isinstance(v, int | float)}
        self.reported_stats = now
        self.batches_done += 1
        return {
            "actor": self.writer_id,
            "seq": self.batches_done,
            "added": added,
            "summary": self.worker.summary_stats(),
        }


def _lock_held_by(output: Path, holder: dict[str, Any]) -> bool:
    from cogbatch.lock import current_holder

    now = current_holder(output) or {}
    return all(now.get(k) == holder.get(k) for k in ("pid", "host", "started"))


def _status_row(
    status: dict[str, list], image_id: str, task: str, state: str, tokens: int, part: str, again: bool
) -> None:
    for name, value in zip(STATUS_SCHEMA.names, (image_id, task, state, tokens, part, again, None, None), strict=True):
        status[name].append(value)


def batch_key(todo: list[tuple[ImageEntry, list[Request]]]) -> str:
    """The same for every retry of a batch (same requests), whichever actor runs it."""
    keys = sorted(f"{entry.image_id}\t{r.task.name}" for entry, reqs in todo for r in reqs)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


def attempts_dir(output: Path, run_id: str) -> Path:
    return Path(output) / ".cogbatch" / "ray" / run_id / "attempts"


class BatchAttempts:
    """Which batches of this run an actor started and did not finish, counted across actor restarts.

    An actor notes a batch before generating it and clears the note once its part is written, so
    the notes left on a batch are the deaths of the actors that ran it. They live in the output
    directory (every node sees it) and belong to one run: the driver removes them when it ends.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def crashes(self, key: str) -> int:
        try:
            return (self.dir / key).read_text().count("\n")
        except FileNotFoundError:
            return 0

    def start(self, key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / key, "a") as f:
            f.write(f"{os.getpid()}\n")

    def finished(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / key).unlink()


def _crash_once_if_armed() -> None:
    target = os.environ.get(CRASH_ONCE_ENV)
    if not target:
        return
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_on_if_armed(todo: list[tuple[ImageEntry, list[Request]]]) -> None:
    name = os.environ.get(CRASH_ON_ENV)
    if name and any(Path(entry.path).name == name for entry, _ in todo):
        os.kill(os.getpid(), signal.SIGKILL)


# -- the driver ----------------------------------------------------------------------------------


def run_ray(cfg: JobConfig, opts: RunOptions | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run a validated job on Ray and return the local engine's summary (`exit_code` says how it ended).

    Connects to the cluster at RAY_ADDRESS when it is set, else starts a local one for this run. One
    actor per GPU by default (`num_gpus=1` each); on a cluster without GPUs (or with `device: cpu`)
    1-2 CPU actors. `workers` (else the job's `workers:`) sets the number of actors. Like the local
    engine, it holds the output's run lock (a second run raises `cogbatch.lock.JobLocked`) and
    appends the run to its history.
    """
    from cogbatch.lock import run_exclusive

    if workers is None:
        workers = getattr(cfg, "workers", None)  # the job's `workers:` key; --workers wins
    if workers is not None and workers < 1:
        raise EngineError(f"--workers must be at least 1, got {workers}")
    _check_ray_installed()  # before the lock and the plan: a missing extra is a usage error, nothing is done
    check_output(cfg)
    return run_exclusive(cfg, lambda holder: _run_ray_locked(cfg, opts or RunOptions(), workers, holder))


@dataclass
class _Run:
    """What the driver knows about the run while the actors work."""

    cfg: JobConfig
    run_id: str
    holder: dict[str, Any]  # this process's entry in the output's run lock
    summary: dict[str, Any]
    progress: _Progress
    stop: _StopFlag
    actor_parts: set[str] = field(default_factory=set)  # parts whose rows an actor reported
    counters: dict[str, float] = field(default_factory=dict)  # the actors' Worker.stats, summed
    actor_summaries: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # actor -> (seq, stats)
    again_tokens: int = 0  # tokens of rows generated by actors that died before reporting them


def _run_ray_locked(cfg: JobConfig, opts: RunOptions, workers: int | None, holder: dict) -> dict:
    """The run under the output's lock; signals are caught from the start, as in the local engine."""
    started = time.time()
    run_id = new_run_id()
    try:
        with _StopFlag() as stop:
            try:
                plan = plan_run(cfg, opts, stop.check, run_id)
            except Interrupted as e:  # a signal while the input was scanned: nothing done
                return _stopped_before_work(cfg, run_id, started, e.signum, opts)
            plan.summary["plan_s"] = round(time.time() - started, 3)  # input scan, hashing, done set
            plan.summary["engine"] = "ray"
            images = len({r.image.image_id for r in plan.todo})
            state = _Run(cfg, run_id, holder, plan.summary, _Progress(len(plan.todo), opts.quiet, images), stop)
            _execute(plan.todo, workers, state)
    except BaseException as e:
        with contextlib.suppress(AttributeError, TypeError):
            e.cogbatch_run_id = run_id  # type: ignore[attr-defined]  # the history line names the run that raised
        raise
    return finish_summary(plan.summary, plan, started, stop.signum, opts)


def _execute(todo: list[Request], workers: int | None, state: _Run) -> None:
    """The pending requests through the actors; then the error rows known before decoding."""
    cfg, run_id = state.cfg, state.run_id
    writer = PartWriter(cfg.output, run_id, flush_rows=cfg.flush_rows, flush_seconds=cfg.flush_seconds)
    shutil.rmtree(attempts_dir(cfg.output, run_id).parent.parent, ignore_errors=True)  # killed runs' notes
    try:
        with writer:
            known = [r for r in todo if r.image.error or r.error]
            runnable = [r for r in todo if not (r.image.error or r.error)]
            if runnable and state.stop.signum is None:  # nothing runnable: no cluster, no model load
                # Ray prints its workers' and raylet's stdout on the driver's stdout, which is for data
                # (`--json`): while Ray runs, everything it prints goes to stderr with the other logs.
                with contextlib.redirect_stdout(sys.stderr):
                    _run_on_cluster(runnable, workers, state)
                _finish_stats(state)
                if state.stop.signum is not None:
                    _recount(state)
            # After the cluster, as the local engine loads its model first: a model that cannot load raises
            # before any row is written.
            _write_known_errors(cfg, known, writer, state)
    finally:
        state.progress.close()
        shutil.rmtree(attempts_dir(cfg.output, run_id).parent, ignore_errors=True)
    state.summary["parts_written"] = len(writer.parts_written) + len(state.actor_parts)


def _check_ray_installed() -> None:
    """Fail fast and cheaply (no import: `import ray.data` takes seconds) when the extra is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken install, or `ray` blocked in sys.modules
        found = False
    if not found:
        raise EngineError(INSTALL_HINT)


def _import_ray(local: bool):
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


def _write_known_errors(cfg: JobConfig, known: list[Request], writer: PartWriter, state: _Run) -> None:
    """Error rows for requests known to fail before decoding (missing file, no question), as locally."""
    for r in known:
        writer.add(error_row(r, r.image.error or r.error, cfg, state.run_id))
    if known:
        state.summary["failed"] += len(known)
        state.progress.update(len(known), len(known), len({r.image.image_id for r in known}))


def input_blocks(requests: list[Request], batch: int) -> list[pa.Table]:
    """Pending requests as tables of one row per image, each a whole number of actor batches.

    Ray Data keeps a small in-memory table as one block, which one actor would process alone; batches
    never span blocks. Blocks of one batch each spread any manifest over every actor; very large ones
    get a few batches per block so that the driver does not create millions of objects.
    """
    by_image: dict[str, list[Request]] = {}
    for r in requests:
        by_image.setdefault(r.image.image_id, []).append(r)
    cols: dict[str, list] = {name: [] for name in INPUT_SCHEMA.names}
    for image_id, reqs in by_image.items():
        e = reqs[0].image
        cols["image_id"].append(image_id)
        cols["path"].append(e.path)
        cols["file"].append(str(Path(e.file).absolute()) if e.file is not None else None)
        cols["row"].append(e.row)
        cols["tasks"].append([r.task.name for r in reqs])
        cols["prompts"].append([r.prompt for r in reqs])
        cols["fingerprints"].append([r.fingerprint for r in reqs])
    table = pa.table(cols, schema=INPUT_SCHEMA)
    n_batches = math.ceil(table.num_rows / batch)
    rows_per_block = batch * max(1, math.ceil(n_batches / _MAX_BLOCKS))
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


def images_per_batch(cfg: JobConfig, n_images: int, n_actors: int) -> int:
    """Images per actor batch, i.e. per part file: about `flush_rows` rows, as the local engine writes.

    Smaller for a small run, so that every actor gets at least two batches: Ray Data bundles small
    blocks up to the batch size, so the batch size itself must shrink for the work to spread.
    """
    by_flush = max(1, cfg.flush_rows // max(1, len(cfg.tasks)))
    return max(1, min(by_flush, math.ceil(n_images / (2 * n_actors))))


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


def _run_on_cluster(runnable: list[Request], workers: int | None, state: _Run) -> None:
    """Start or join the cluster, run the actor pool over the pending images, count what comes back."""
    cfg, summary = state.cfg, state.summary
    address = os.environ.get("RAY_ADDRESS") or None
    ray = _import_ray(local=address is None)
    started_here = not ray.is_initialized()  # a notebook's own ray.init() is used as it is, and kept
    if started_here:
        t0 = time.monotonic()
        _init(ray, address, cfg, workers)
        summary["ray_startup_s"] = round(time.monotonic() - t0, 3)
    _handle_signals_again(state.stop)  # ray.init installs its own SIGTERM handler
    try:
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        n, resources = plan_actors(cfg, nodes, workers)
        actor_cfg = cfg
        if "num_gpus" in resources and cfg.device.startswith("cuda:"):
            actor_cfg = replace(cfg, device="cuda")  # each actor sees its one GPU as cuda:0
        n_images = len({r.image.image_id for r in runnable})
        batch = images_per_batch(cfg, n_images, n)
        summary["workers"] = n
        log.info("ray: %d actor(s), each with %s", n, ", ".join(f"{k}={v}" for k, v in resources.items()))
        with _data_context(ray, quiet=state.progress.quiet):
            ds = ray.data.from_arrow(input_blocks(runnable, batch))
            ds = ds.map_batches(
                CaptionActor,
                fn_constructor_kwargs={
                    "cfg": actor_cfg,
                    "run_id": state.run_id,
                    "cwd": os.getcwd(),
                    "holder": state.holder,
                },
                batch_size=batch,
                batch_format="pyarrow",
                # One batch in flight per actor: a killed actor then fails only the batch it was running,
                # whose crash note counts the death. A batch queued behind it would lose a retry without a
                # note, and after MAX_BATCH_CRASHES such losses fail the whole job (seen in a CI run). The
                # input is image paths, so prefetching the next batch buys nothing.
                compute=ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1),
                # Ray Data's defaults are -1 and -1: a batch that kills its actor would be retried forever.
                max_restarts=MAX_ACTOR_RESTARTS,
                max_task_retries=MAX_BATCH_CRASHES,
                **resources,
            )
            try:
                _consume(ds, state)
            except ray.exceptions.RayError as e:
                raise _failure(e) from e
    finally:
        if started_here:
            ray.shutdown()


def _consume(ds: Any, state: _Run) -> None:
    """Count the actors' status tables as they come; on a signal, stop taking batches."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for status in it:
            _account(status, state)
            if state.stop.signum is not None:  # batches in flight are dropped; their rows are not written
                break
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _failure(error: Exception) -> Exception:
    """What a failed Ray job raises: the user's error it wraps (a model that does not fit: exit 2), else
    `RayRunFailed` with Ray's first line (its messages run to dozens of lines)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, UserError):
        return cause
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return RayRunFailed(
        f"the Ray job failed: {type(error).__name__}: {first} (an actor is restarted at most "
        f"{MAX_ACTOR_RESTARTS} times; a batch that kills its actor {MAX_BATCH_CRASHES} times becomes error rows). "
        "The parts written so far are kept: run the same command again to resume"
    )


def _account(status: pa.Table, state: _Run) -> None:
    summary = state.summary
    cols = status.to_pydict()
    failed = sum(s != "ok" for s in cols["status"])
    summary["done"] += len(cols["status"]) - failed
    summary["failed"] += failed
    summary["model_loaded"] = True
    state.actor_parts.update(p for p in cols["part"] if p)
    state.again_tokens += sum(t or 0 for t, again in zip(cols["tokens_out"], cols["again"], strict=True) if again)
    for report in cols["model_load"]:
        if report and "model_load" not in summary:
            summary["model_load"] = json.loads(report)
            summary["model_load_s"] = summary["model_load"].pop("model_load_s", None)  # the first actor's
    for report in cols["stats"]:
        if report:
            _add_stats(state, json.loads(report))
    state.progress.update(len(cols["status"]), failed, len(set(cols["image_id"])))


def _add_stats(state: _Run, report: dict[str, Any]) -> None:
    for k, v in report["added"].items():
        state.counters[k] = state.counters.get(k, 0) + v
    seq, _ = state.actor_summaries.get(report["actor"], (0, {}))
    if report["seq"] > seq:  # batches of one actor may come back out of order
        state.actor_summaries[report["actor"]] = (report["seq"], report["summary"])


def _finish_stats(state: _Run) -> None:
    """The local engine's generated_tokens and `Worker.summary_stats()` keys, over all actors."""
    counted = state.counters.get("generated_tokens", 0) + state.again_tokens
    state.summary["generated_tokens"] = int(counted)
    if state.actor_summaries:
        summaries = [s for _, s in state.actor_summaries.values()]
        state.summary.update(merge_worker_stats(state.counters, summaries))


def merge_worker_stats(counters: dict[str, float], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """`Worker.summary_stats()` of one worker that had done the work of all the actors.

    A key that is one of the counters (`Worker.stats`) is their sum; a ratio of counters is
    recomputed from the sums; anything else is a setting of each actor's plan (execution mode,
    planned batch), reported as the most common value. Counters of a batch whose actor died before
    reporting it are not in the sums (its rows are still counted exactly, from the parts).
    """
    merged: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for s in summaries for k in s))
    for key in keys:
        values = [s[key] for s in summaries if key in s]
        if key in _RATIOS and all(c in counters for c in _RATIOS[key][:2]):
            num, den, digits = _RATIOS[key]
            merged[key] = round(counters[num] / counters[den], digits) if counters[den] else 0.0
        elif key in counters and isinstance(values[0], int | float) and not isinstance(values[0], bool):
            total = counters[key]
            merged[key] = int(total) if isinstance(values[0], int) else round(total, 3)
        else:
            try:
                merged[key] = Counter(values).most_common(1)[0][0]
            except TypeError:  # unhashable (a dict): the first actor's
                merged[key] = values[0]
    return merged


def _recount(state: _Run) -> None:
    """After an interruption, count what the actors wrote: batches in flight may have landed unreported."""
    prefix = f"part-{state.run_id}-a"
    ok = failed = unreported_tokens = 0
    for name in os.listdir(state.cfg.output):
        if not name.startswith(prefix) or not name.endswith(".parquet"):
            continue
        try:
            t = pq.read_table(state.cfg.output / name, columns=["status", "tokens_out"]).to_pydict()
        except FileNotFoundError:
            continue
        n_ok = sum(s == "ok" for s in t["status"])
        ok, failed = ok + n_ok, failed + len(t["status"]) - n_ok
        if name not in state.actor_parts:
            unreported_tokens += sum(x or 0 for x in t["tokens_out"])
            state.actor_parts.add(name)
    state.summary.update(done=ok, failed=failed)
    state.summary["generated_tokens"] += unreported_tokens


def _init(ray, address: str | None, cfg: JobConfig, workers: int | None) -> None:
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


def _handle_signals_again(stop: _StopFlag) -> None:
    for s in stop.previous:
        with contextlib.suppress(ValueError):
            signal.signal(s, stop._handle)


@contextlib.contextmanager
def _data_context(ray, quiet: bool) -> Iterator[None]:
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

"""The same job on Ray Data: one model per actor, one GPU per actor, the local engine's per-batch code.

    summary = run_ray(cfg, RunOptions(), workers=4)      # `cogbatch run JOB.yaml --engine ray --workers 4`

What differs from the local engine is only scheduling. Pending work comes from the same
run prologue (so resume and incremental runs behave identically); it becomes a Ray Dataset with one
row per image (its requests grouped, so an image is decoded once), built on the driver
(`from_items`: no Ray task for it); `map_batches` sends batches of
images to a fixed pool of `CaptionActor`s, each of which loads the model once, decodes with
`load_entry`, calls `ModelWorker.process` and writes the rows itself as one complete part file per batch
(`part-<run_id>-a<actor>-NNNNN.parquet`, atomic like every part). The driver only reads the small
status tables the actors return: progress, counts, and each batch's worker counters, merged into the
local engine's summary.

Exactly once on Ray: a batch's rows reach the output only by the atomic rename of its part, so a
killed driver or actor loses at most the batches in flight. Ray restarts a dead actor and retries
its batch; a batch that had written its part before its actor died would then be generated twice, so
before generating, each actor skips requests that a part of this run already holds. Retries are
bounded by the actors themselves (Ray Data's default is to retry forever, and Ray 2.60 deprecates
passing `max_restarts` / `max_task_retries` to `map_batches`): a batch whose actor died
`MAX_BATCH_CRASHES` times becomes error rows, and an actor started more than `MAX_ACTOR_RESTARTS`
times refuses to load again, which fails the run (resumable).

Sharp edges of Ray Data 2.60 handled here: a small manifest in one block would feed one actor (blocks of
about one batch each); `max_errored_blocks` drops whole blocks (errors are rows, never exceptions); all-null
columns get type null (the status table has an explicit schema); `from_arrow` runs a Ray task per block
to read its schema, and on a small machine the workers of those tasks exit as idle while the run goes
on, where Ray 2.60 sometimes aborts in their shutdown ("Mutex corrupt ... SIGABRT", a crash dump on the
driver's stderr), so the input is built with `from_items`, on the driver. The cluster itself
(`ray_cluster`) and the actor (`ray_actor`) have modules of their own; Ray is imported only when a run
asks for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.engines.progress import describe_source
from cogbatch.engines.prologue import Run, RunOptions, check_new_output_model, check_output, run_engine
from cogbatch.engines.ray_actor import MAX_BATCH_CRASHES, CaptionActor, attempts_dir
from cogbatch.engines.ray_cluster import (
    MAX_ACTOR_RESTARTS,
    check_ray_installed,
    data_context,
    import_ray,
    init_cluster,
    plan_actors,
    quiet_ray_warnings,
    without_ray_records,
)
from cogbatch.errors import EngineError, RayRunFailed, UserError
from cogbatch.inputs.pending import Request
from cogbatch.job.config import JobConfig
from cogbatch.results import RunSummary, WorkerCounters, WorkerStats
from cogbatch.store import PartWriter
from cogbatch.worker.rows import error_row

log = logging.getLogger("cogbatch")

# A manifest becomes at most this many blocks; below it every block is about one actor batch, so a small
# manifest is spread over all actors and a retry redoes one batch.
_MAX_BLOCKS = 2048


def run_ray(cfg: JobConfig, opts: RunOptions | None = None, workers: int | None = None) -> RunSummary:
    """Run a validated job on Ray and return the local engine's summary (`exit_code` says how it ended).

    Connects to the cluster at RAY_ADDRESS when it is set, else starts a local one for this run. One
    actor per GPU by default (`num_gpus=1` each); on a cluster without GPUs (or with `device: cpu`)
    1-2 CPU actors. `workers` (else the job's `workers:`) sets the number of actors. Like the local
    engine, it holds the output's run lock (a second run raises `JobLocked`) and appends the run to
    its history.
    """
    if workers is None:
        workers = cfg.workers  # the job's `workers:` key; --workers wins
    if workers is not None and workers < 1:
        raise EngineError(f"--workers must be at least 1, got {workers}")
    # A missing extra is a usage error found before the lock and the plan: nothing is done.
    preflight = (lambda _cfg: check_ray_installed(), check_new_output_model, check_output)
    return run_engine(cfg, opts or RunOptions(), lambda run: _execute(run, workers), preflight)


@dataclass
class _Driver:
    """What the driver learns from the actors while they work."""

    run: Run
    actor_parts: set[str] = field(default_factory=set)  # parts whose rows an actor reported
    counters: WorkerCounters = field(default_factory=WorkerCounters)  # the actors' counters, summed
    actor_plans: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # actor -> (seq, plan)
    again_tokens: int = 0  # tokens of rows generated by actors that died before reporting them


def _execute(run: Run, workers: int | None) -> None:
    """The pending requests through the actors; then the error rows known before decoding."""
    cfg, run_id = run.cfg, run.run_id
    run.summary.engine = "ray"
    state = _Driver(run)
    writer = PartWriter(cfg.output, run_id, flush_rows=cfg.flush_rows, flush_seconds=cfg.flush_seconds)
    shutil.rmtree(attempts_dir(cfg.output, run_id).parent.parent, ignore_errors=True)  # killed runs' notes
    try:
        with writer:
            known = [r for r in run.todo if r.image.error or r.error]
            runnable = [r for r in run.todo if not (r.image.error or r.error)]
            if runnable and run.stop.signum is None:  # nothing runnable: no cluster, no model load
                # Ray prints its workers' and raylet's stdout on the driver's stdout, which is for data
                # (`--json`): while Ray runs, everything it prints goes to stderr with the other logs.
                with contextlib.redirect_stdout(sys.stderr):
                    _run_on_cluster(runnable, workers, state)
                _finish_stats(state)
                if run.stop.signum is not None:
                    _recount(state)
            # After the cluster, as the local engine loads its model first: a model that cannot load raises
            # before any row is written.
            _write_known_errors(known, writer, run)
    finally:
        shutil.rmtree(attempts_dir(cfg.output, run_id).parent, ignore_errors=True)
    run.summary.parts_written = len(writer.parts_written) + len(state.actor_parts)


def _write_known_errors(known: list[Request], writer: PartWriter, run: Run) -> None:
    """Error rows for requests known to fail before decoding (missing file, no question), as locally."""
    for r in known:
        writer.add(error_row(r, r.image.error or r.error, run.cfg, run.run_id))
        run.progress.request_done(r.image.image_id, error=True)
    run.summary.failed += len(known)


def input_rows(requests: list[Request]) -> list[dict[str, Any]]:
    """Pending requests as one record per image: its requests grouped, so that an actor decodes it once."""
    by_image: dict[str, list[Request]] = {}
    for r in requests:
        by_image.setdefault(r.image.image_id, []).append(r)
    rows = []
    for image_id, reqs in by_image.items():
        e = reqs[0].image
        rows.append({
            "image_id": image_id,
            "path": e.path,  # what result rows show
            "file": str(Path(e.file).absolute()) if e.file is not None else None,  # None: manifest bytes
            "row": e.row,  # the manifest row holding inline bytes, or None
            "tasks": [r.task.name for r in reqs],
            "prompts": [r.prompt for r in reqs],
            "fingerprints": [r.fingerprint for r in reqs],
        })  # fmt: skip
    return rows


def input_block_count(n_images: int, batch: int) -> int:
    """Blocks of the input Dataset: about one actor batch each, at most `_MAX_BLOCKS`.

    Ray Data keeps a small in-memory input as one block, which one actor would process alone. Blocks
    of about one batch spread any manifest over every actor; very large ones get a few batches per
    block so that the driver does not create millions of objects.
    """
    return max(1, min(math.ceil(n_images / batch), _MAX_BLOCKS))


def images_per_batch(cfg: JobConfig, n_images: int, n_actors: int) -> int:
    """Images per actor batch, i.e. per part file: about `flush_rows` rows, as the local engine writes.

    Smaller for a small run, so that every actor gets at least two batches: Ray Data bundles small
    blocks up to the batch size, so the batch size itself must shrink for the work to spread.
    """
    by_flush = max(1, cfg.flush_rows // max(1, len(cfg.tasks)))
    return max(1, min(by_flush, math.ceil(n_images / (2 * n_actors))))


def _run_on_cluster(runnable: list[Request], workers: int | None, state: _Driver) -> None:
    """Start or join the cluster, run the actor pool over the pending images, count what comes back.

    Ray's own warnings and log records are off for the run unless `--verbose` (the warning filters are
    restored after it: a notebook keeps its own).
    """
    verbose = state.run.options.verbose
    with warnings.catch_warnings(), without_ray_records(enabled=not verbose):
        if not verbose:
            quiet_ray_warnings()
        _run_on_ray(runnable, workers, state)


def _run_on_ray(runnable: list[Request], workers: int | None, state: _Driver) -> None:
    run = state.run
    cfg, summary, verbose = run.cfg, run.summary, run.options.verbose
    address = os.environ.get("RAY_ADDRESS") or None
    ray = import_ray(local=address is None, verbose=verbose)
    started_here = not ray.is_initialized()  # a notebook's own ray.init() is used as it is, and kept
    if started_here:
        t0 = time.monotonic()
        init_cluster(ray, address, cfg, workers, verbose=verbose)
        summary.ray_startup_s = round(time.monotonic() - t0, 3)
    run.stop.handle_again()  # ray.init installs its own SIGTERM handler
    try:
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        n, resources = plan_actors(cfg, nodes, workers)
        actor_cfg = cfg
        if "num_gpus" in resources and cfg.device.startswith("cuda:"):
            actor_cfg = replace(cfg, device="cuda")  # each actor sees its one GPU as cuda:0
        n_images = len({r.image.image_id for r in runnable})
        batch = images_per_batch(cfg, n_images, n)
        summary.workers = n
        each = ", ".join(f"{k}={v}" for k, v in resources.items())
        log.info("ray: %d actor(s), each with %s, loading model %s (%s) ...", n, each, cfg.model,
                 describe_source(cfg.source))  # fmt: skip
        with data_context(ray, verbose=verbose):
            ds = ray.data.from_items(input_rows(runnable), override_num_blocks=input_block_count(n_images, batch))
            ds = ds.map_batches(
                CaptionActor,
                fn_constructor_kwargs={
                    "cfg": actor_cfg,
                    "run_id": run.run_id,
                    "cwd": os.getcwd(),
                    "holder": run.holder,
                    "quiet": run.options.quiet,  # the driver's logging and warning filters, in every actor
                    "verbose": verbose,
                },
                batch_size=batch,
                batch_format="pyarrow",
                # One batch in flight per actor: a killed actor then fails only the batch it was running,
                # whose crash note counts the death. A batch queued behind it would lose a retry without a
                # note, and after MAX_BATCH_CRASHES such losses fail the whole job (seen in a CI run). The
                # input is image paths, so prefetching the next batch buys nothing.
                compute=ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1),
                # Ray Data restarts actors and retries their batches forever: the actors bound both
                # (MAX_ACTOR_RESTARTS, MAX_BATCH_CRASHES), since passing max_restarts here is deprecated.
                **resources,  # num_cpus or num_gpus, named parameters of map_batches
            )
            try:
                _consume(ds, state)
            except ray.exceptions.RayError as e:
                raise _failure(e) from e
    finally:
        if started_here:
            ray.shutdown()


def _consume(ds: Any, state: _Driver) -> None:
    """Count the actors' status tables as they come; on a signal, stop taking batches."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for status in it:
            _account(status, state)
            if state.run.stop.signum is not None:  # batches in flight are dropped; their rows are not written
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


def _account(status: pa.Table, state: _Driver) -> None:
    summary = state.run.summary
    cols = status.to_pydict()
    failed = sum(s != "ok" for s in cols["status"])
    summary.done += len(cols["status"]) - failed
    summary.failed += failed
    summary.model_loaded = True
    state.actor_parts.update(p for p in cols["part"] if p)
    state.again_tokens += sum(t or 0 for t, again in zip(cols["tokens_out"], cols["again"], strict=True) if again)
    for report in cols["model_load"]:
        if report and summary.model_load is None:
            summary.model_load = json.loads(report)
            summary.model_load_s = summary.model_load.pop("model_load_s", None)  # the first actor's
    for report in cols["stats"]:
        if report:
            _add_stats(state, json.loads(report))
    for image_id, status_ in zip(cols["image_id"], cols["status"], strict=True):
        state.run.progress.request_done(image_id, error=status_ != "ok")


def _add_stats(state: _Driver, report: dict[str, Any]) -> None:
    state.counters.add(report["added"])
    seq, _ = state.actor_plans.get(report["actor"], (0, {}))
    if report["seq"] > seq:  # batches of one actor may come back out of order
        state.actor_plans[report["actor"]] = (report["seq"], report["plan"])


def _finish_stats(state: _Driver) -> None:
    """The local engine's generated_tokens and worker stats, over all actors."""
    state.run.summary.generated_tokens = int(state.counters.generated_tokens + state.again_tokens)
    if state.actor_plans:
        state.run.summary.worker = merge_worker_stats(state.counters, [p for _, p in state.actor_plans.values()])


def merge_worker_stats(counters: WorkerCounters, plans: list[dict[str, Any]]) -> WorkerStats:
    """The stats of one worker that had done the work of all the actors.

    Counters are summed, ratios of counters recomputed from the sums, and each actor's plan (execution
    mode, planned batch) reported as the most common one. Counters of a batch whose actor died before
    reporting it are not in the sums (its rows are still counted exactly, from the parts).
    """
    return WorkerStats.of(counters, [p["mode"] for p in plans], [p["slots"] for p in plans])


def _recount(state: _Driver) -> None:
    """After an interruption, count what the actors wrote: batches in flight may have landed unreported."""
    run = state.run
    prefix = f"part-{run.run_id}-a"
    ok = failed = unreported_tokens = 0
    for name in os.listdir(run.cfg.output):
        if not name.startswith(prefix) or not name.endswith(".parquet"):
            continue
        try:
            t = pq.read_table(run.cfg.output / name, columns=["status", "tokens_out"]).to_pydict()
        except FileNotFoundError:
            continue
        n_ok = sum(s == "ok" for s in t["status"])
        ok, failed = ok + n_ok, failed + len(t["status"]) - n_ok
        if name not in state.actor_parts:
            unreported_tokens += sum(x or 0 for x in t["tokens_out"])
            state.actor_parts.add(name)
    run.summary.done, run.summary.failed = ok, failed
    run.summary.generated_tokens += unreported_tokens

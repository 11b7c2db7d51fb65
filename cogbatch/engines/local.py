"""The local engine: one process, one model worker, images decoded by loader threads a chunk ahead.

    summary = run_local(cfg)          # also: cogbatch.run_job(path, **overrides)

Nothing is lost on a crash: rows reach the output only as complete part files, and the next run
recomputes what is pending from those files. Bad images become error rows; only a bug or an unusable
model aborts the run.
"""

from __future__ import annotations

import logging
import time

from cogbatch.engines.progress import LoadProgress, describe_source
from cogbatch.engines.prologue import (
    Run,
    RunOptions,
    check_device,
    check_new_output_model,
    check_output,
    run_engine,
)
from cogbatch.inputs.pending import Request
from cogbatch.job.config import JobConfig
from cogbatch.results import RunSummary
from cogbatch.store import PartWriter
from cogbatch.worker.loading import LoadedImage, prefetch
from cogbatch.worker.rows import error_row
from cogbatch.worker.worker import ModelWorker

log = logging.getLogger("cogbatch")


def run_local(cfg: JobConfig, options: RunOptions | None = None) -> RunSummary:
    """Run a validated job in this process and return its summary (`exit_code` says how it ended).

    One run per output at a time: a second one raises `JobLocked` at once. Every run that got the lock
    appends a line to `<output>/runs.jsonl`, also when it raises. A device or output that cannot work
    raises `ConfigError` before the lock is taken.
    """
    preflight = (check_device, check_new_output_model, check_output)  # check_output creates the output: last
    return run_engine(cfg, options or RunOptions(), _execute, preflight=preflight)


def _execute(run: Run) -> None:
    cfg = run.cfg
    with PartWriter(cfg.output, run.run_id, flush_rows=cfg.flush_rows, flush_seconds=cfg.flush_seconds) as writer:
        _process(run, writer)
    run.summary.parts_written = len(writer.parts_written)


def _process(run: Run, writer: PartWriter) -> None:
    """The model first, so that a model or ceiling that cannot work raises before any row is written
    (exit 2 means nothing was done); then the rows known to be errors (missing file, no question);
    then the decoded images, through the worker."""
    cfg, summary, stop = run.cfg, run.summary, run.stop
    if stop.signum is not None:  # a signal during the scan or the pending computation
        return
    known = [r for r in run.todo if r.image.error or r.error]
    runnable = [r for r in run.todo if not (r.image.error or r.error)]
    worker = None
    if runnable:
        t0 = time.perf_counter()
        log.info("loading model %s (%s) ...", cfg.model, describe_source(cfg.source))
        with LoadProgress(run.options.quiet) as on_bytes:
            worker = ModelWorker(cfg, run.run_id, load_progress=on_bytes)
        summary.model_load_s = round(time.perf_counter() - t0, 3)  # imports, weights, tokenizer, plan
        summary.model_loaded = True
        summary.model_load = worker.load_report()
        if cfg.source.is_tiny:
            log.warning("NOTE: %s has random weights: its text is random (a smoke run, not captions)", cfg.model)
    if stop.signum is not None:
        return
    run.progress.start()
    for r in known:
        writer.add(error_row(r, r.image.error or r.error, cfg, run.run_id))
        summary.failed += 1
        run.progress.request_done(r.image.image_id, error=True)
    if worker is not None:
        _generate(run, worker, runnable, writer)


def _generate(run: Run, worker: ModelWorker, runnable: list[Request], writer: PartWriter) -> None:
    """Decoded images, a chunk at a time, through the worker; rows to the writer as they come."""
    cfg, summary = run.cfg, run.summary
    by_image: dict[str, list[Request]] = {}
    for r in runnable:
        by_image.setdefault(r.image.image_id, []).append(r)
    images = [reqs[0].image for reqs in by_image.values()]
    chunk: list[tuple[LoadedImage, list[Request]]] = []

    def row_made(row: dict) -> None:  # as each request finishes, not per chunk
        run.progress.request_done(row["image_id"], error=row["status"] != "ok")

    def flush() -> None:
        rows = worker.process(chunk, on_row=row_made)
        for row in rows:
            writer.add(row)
        ok = sum(row["status"] == "ok" for row in rows)
        summary.done += ok
        summary.failed += len(rows) - ok
        chunk.clear()

    # One chunk decoding ahead while the model works on the current one (the window bounds host memory).
    for img in prefetch(images, cfg, worker.image_size, worker.chunk_images + 2 * cfg.loader_threads):
        if run.stop.signum is not None:
            break
        chunk.append((img, by_image[img.entry.image_id]))
        if len(chunk) >= worker.chunk_images:
            flush()
    if run.stop.signum is None and chunk:
        flush()
    summary.generated_tokens = int(worker.stats.generated_tokens)
    summary.worker = worker.summary_stats()
    device = getattr(worker.model, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        summary.peak_device_bytes = int(torch.cuda.max_memory_allocated(device))

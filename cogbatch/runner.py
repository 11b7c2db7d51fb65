"""The job loop of one process: pending work, image prefetch, batches, result rows, progress, signals.

    cfg = load_job("jobs/caption.yaml")
    summary = run(cfg)          # also: cogbatch.run_job(path, **overrides)

Nothing is lost on a crash: rows reach the output only as complete part files, and the next run
recomputes what is pending from those files. Bad images become error rows; only a bug or an
unusable model aborts the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cogbatch.config import JobConfig
from cogbatch.manifest import (
    ImageEntry,
    ManifestBytes,
    Request,
    build_entries,
    changed_settings,
    expand_requests,
    limit_images,
    pending,
)
from cogbatch.store import PartWriter, done_keys, prepare_output
from cogbatch.worker import LoadedImage, Worker, error_row, load_entry, resolved_dtype

log = logging.getLogger("cogbatch")

EXIT_OK, EXIT_ABORTED, EXIT_CONFIG, EXIT_ROW_ERRORS = 0, 1, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class SettingsChanged(Exception):
    """Existing rows were made with other settings and the user did not ask to redo them."""


@dataclass
class RunOptions:
    redo_changed: bool = False
    fail_on_error: bool = False
    quiet: bool = False


# -- images --------------------------------------------------------------------------------------


def prefetch(entries: list[ImageEntry], cfg: JobConfig, image_size: int, chunk: int) -> Iterator[LoadedImage]:
    """Images in order, decoded by background threads at most `window` images ahead of the model."""
    inline = ManifestBytes(cfg.input.manifest, cfg.input.bytes_column) if cfg.input.bytes_column else None
    window = max(chunk, 2 * cfg.loader_threads)
    with ThreadPoolExecutor(cfg.loader_threads, thread_name_prefix="cogbatch-load") as pool:
        queue: list[Future] = []
        it = iter(entries)
        for e in it:
            queue.append(pool.submit(load_entry, e, cfg, image_size, inline))
            if len(queue) >= window:
                break
        while queue:
            result = queue.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(load_entry, nxt, cfg, image_size, inline))
            yield result


# -- the run -------------------------------------------------------------------------------------


class _StopFlag:
    """First Ctrl-C / SIGTERM: finish the batch in flight, flush, exit. A second one: stop at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker): no handlers
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("stopping after the batch in flight (signal %d); press Ctrl-C again to stop at once", signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class _Progress:
    """A tqdm bar on a terminal; periodic log lines otherwise (cron logs stay readable)."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="req", desc="cogbatch", file=sys.stderr, disable=not self.tty)
        self.total, self.done, self.errors = total, 0, 0
        self.last_log = time.monotonic()

    def update(self, n: int, errors: int) -> None:
        self.done += n
        self.errors += errors
        self.bar.update(n)
        self.bar.set_postfix(errors=self.errors, refresh=False)
        if not self.tty and not self.quiet and time.monotonic() - self.last_log > 30:
            self.last_log = time.monotonic()
            log.info("%d/%d requests done, %d errors", self.done, self.total, self.errors)

    def close(self) -> None:
        self.bar.close()


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_resolved_config(cfg: JobConfig) -> None:
    target = cfg.output / "config.resolved.yaml"
    tmp = target.with_name(f".tmp-{os.getpid()}-config.resolved.yaml")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, target)


@dataclass
class Plan:
    """What a run will do: computed identically for every engine, before any model is loaded."""

    run_id: str
    todo: list[Request]  # pending requests, in order, after --limit
    summary: dict[str, Any]  # counts so far; the engine adds done / failed / timings


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def plan_run(cfg: JobConfig, opts: RunOptions) -> Plan:
    """Pending work = images x tasks - rows already in the output; refuse changed settings."""
    # Pillow warns once per process about odd EXIF blocks; such an image still decodes fine.
    warnings.filterwarnings("ignore", message="(Possibly )?[Cc]orrupt EXIF", category=UserWarning)
    run_id = new_run_id()
    prepare_output(cfg.output)
    dtype = resolved_dtype(cfg)
    fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in cfg.tasks}
    done = done_keys(cfg.output)
    changed = changed_settings(done, fingerprints)
    registry = SettingsRegistry(cfg.output)
    if changed and not opts.redo_changed:
        raise SettingsChanged(_changed_message(cfg, changed, registry, fingerprints, dtype))
    registry.record({fingerprints[t.name]: {**cfg.fingerprint_fields(t), "dtype": dtype} for t in cfg.tasks})
    write_resolved_config(cfg)

    entries = build_entries(cfg)
    requests = expand_requests(entries, cfg, fingerprints)
    open_requests = pending(requests, done, opts.redo_changed)
    todo = limit_images(open_requests, cfg.limit)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "output": str(cfg.output),
        "model": cfg.model,
        "quant": cfg.quantization.describe(),
        "images": len({e.image_id for e in entries}),
        "requests_total": len(requests),
        "skipped": len(requests) - len(open_requests),
        "pending": len(todo),
        "done": 0,
        "failed": 0,
        "generated_tokens": 0,
        "model_loaded": False,
    }
    if not todo:
        summary["message"] = "nothing to do: every image and task is already in the output"
    return Plan(run_id, todo, summary)


def finish_summary(
    summary: dict[str, Any], plan: Plan, started: float, interrupted_by: int | None, opts: RunOptions
) -> dict[str, Any]:
    """Timings, memory and the exit code, the same for every engine."""
    wall = time.time() - started
    summary.update(
        {
            "wall_s": round(wall, 3),
            "images_per_s": round(len({r.image.image_id for r in plan.todo}) / wall, 3) if wall else 0.0,
            "tokens_per_s": round(summary["generated_tokens"] / wall, 2) if wall else 0.0,
            "peak_host_rss_bytes": _peak_rss_bytes(),
        }
    )
    if interrupted_by is not None:
        summary["exit_code"] = EXIT_SIGNAL[interrupted_by]
        summary["interrupted"] = True
    elif opts.fail_on_error and summary["failed"]:
        summary["exit_code"] = EXIT_ROW_ERRORS
    else:
        summary["exit_code"] = EXIT_OK
    return summary


def run(cfg: JobConfig, options: RunOptions | None = None) -> dict[str, Any]:
    """Run a validated job and return its summary (`exit_code` says how it ended).

    One run per output at a time: a second one raises `cogbatch.lock.JobLocked` at once. Every run
    that got the lock appends a line to `<output>/runs.jsonl` (`cogbatch.history`), also when it raises.
    """
    from cogbatch.lock import run_exclusive

    return run_exclusive(cfg, lambda _holder: _run_locked(cfg, options))


def _run_locked(cfg: JobConfig, options: RunOptions | None = None) -> dict[str, Any]:
    """The run itself, under the output's lock (see `run`)."""
    opts = options or RunOptions()
    started = time.time()
    plan = plan_run(cfg, opts)
    stop = _StopFlag()
    progress = _Progress(len(plan.todo), opts.quiet)
    writer = PartWriter(cfg.output, plan.run_id, flush_rows=cfg.flush_rows, flush_seconds=cfg.flush_seconds)
    try:
        with stop, writer:
            _process(cfg, plan.todo, writer, progress, plan.summary, stop, plan.run_id)
    finally:
        progress.close()
    plan.summary["parts_written"] = len(writer.parts_written)
    return finish_summary(plan.summary, plan, started, stop.signum, opts)


def _process(cfg, todo, writer, progress, summary, stop, run_id) -> None:
    """Error rows for what cannot run; chunks of decoded images through the worker for the rest."""
    runnable = []
    for r in todo:
        reason = r.image.error or r.error
        if reason:
            writer.add(error_row(r, reason, cfg, run_id))
            summary["failed"] += 1
            progress.update(1, 1)
        else:
            runnable.append(r)
    if not runnable or stop.signum is not None:
        return

    worker = Worker(cfg, run_id)
    summary["model_loaded"] = True
    summary["model_load"] = worker.load_report()
    by_image: dict[str, list[Request]] = {}
    for r in runnable:
        by_image.setdefault(r.image.image_id, []).append(r)
    images = [reqs[0].image for reqs in by_image.values()]
    chunk: list[tuple[LoadedImage, list[Request]]] = []

    def flush() -> None:
        rows = worker.process(chunk)
        for row in rows:
            writer.add(row)
        ok = sum(row["status"] == "ok" for row in rows)
        summary["done"] += ok
        summary["failed"] += len(rows) - ok
        progress.update(len(rows), len(rows) - ok)
        chunk.clear()

    for img in prefetch(images, cfg, worker.image_size, 2 * worker.chunk_images):
        if stop.signum is not None:
            break
        chunk.append((img, by_image[img.entry.image_id]))
        if len(chunk) >= worker.chunk_images:
            flush()
    if stop.signum is None and chunk:
        flush()
    summary["generated_tokens"] = int(worker.stats["generated_tokens"])
    summary.update(worker.summary_stats())


class SettingsRegistry:
    """fingerprint -> the settings behind it, kept beside the output so a change can be named."""

    def __init__(self, output: Path) -> None:
        self.file = output / ".cogbatch" / "settings.json"
        try:
            self.known: dict[str, dict[str, Any]] = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.known = {}

    def record(self, settings: dict[str, dict[str, Any]]) -> None:
        if all(fp in self.known for fp in settings):
            return
        self.known.update(settings)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".tmp-{os.getpid()}-settings.json")
        tmp.write_text(json.dumps(self.known, indent=1, sort_keys=True))
        os.replace(tmp, self.file)


def _changed_message(
    cfg: JobConfig, changed: dict[str, int], registry: SettingsRegistry, fingerprints: dict[str, str], dtype: str
) -> str:
    done = {(task, fp) for (_, task), fp in done_keys(cfg.output).items()}
    lines = []
    for task in cfg.tasks:
        if task.name not in changed:
            continue
        new = {**cfg.fingerprint_fields(task), "dtype": dtype}
        diffs = set()
        for t, fp in done:
            old = registry.known.get(fp) if t == task.name and fp != fingerprints[task.name] else None
            if old:
                diffs |= {f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)}
        what = "; ".join(sorted(diffs)) or "settings not recorded"
        lines.append(f"task {task.name!r} ({changed[task.name]} rows): {what}")
    return (
        f"the output {cfg.output} holds rows made with other settings - "
        + " | ".join(lines)
        + ". Run with --redo-changed to redo them with the new settings, or write to another --output."
    )

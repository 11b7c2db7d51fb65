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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cogbatch.config import TINY_PREFIX, JobConfig
from cogbatch.errors import EXIT_OK, EXIT_ROW_ERRORS, EXIT_SIGNAL, ConfigError, Interrupted, SettingsChanged
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


@dataclass
class RunOptions:
    redo_changed: bool = False
    retry_errors: bool = False
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
    """First Ctrl-C / SIGTERM: finish the batch in flight, flush, exit. A second one: stop at once.

    "At once" raises `Interrupted` wherever the main thread is; rows reach the output only as whole
    part files, so even then the output stays complete and resumable (the CLI exits 130 / 143).
    """

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
            raise Interrupted(signum)
        self.signum = signum
        log.warning("stopping after the batch in flight (signal %d); press Ctrl-C again to stop at once", signum)

    def check(self) -> None:
        """Raise `Interrupted` once a signal came: for loops before any work (the input scan)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class _Progress:
    """A tqdm bar on a terminal; periodic log lines otherwise (cron logs stay readable); nothing if quiet.

    The bar counts requests (its rate and ETA); images done and errors so far are shown beside it.
    """

    def __init__(self, total: int, quiet: bool, images: int | None = None) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="req", desc="cogbatch", file=sys.stderr, disable=not self.tty)
        self.total, self.done, self.errors = total, 0, 0
        self.images_total, self.images = images, 0
        self.last_log = time.monotonic()

    def update(self, n: int, errors: int, images: int = 0) -> None:
        self.done += n
        self.errors += errors
        self.images += images
        self.bar.update(n)
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        if not self.tty and not self.quiet and time.monotonic() - self.last_log > 30:
            self.last_log = time.monotonic()
            log.info("%d/%d requests done, %s", self.done, self.total, self.postfix())

    def postfix(self) -> str:
        if self.images_total is None:  # an engine that counts requests only
            return f"errors {self.errors}"
        return f"images {self.images}/{self.images_total}, errors {self.errors}"

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


def _no_check() -> None:
    return None


def plan_run(
    cfg: JobConfig, opts: RunOptions, check: Callable[[], None] = _no_check, run_id: str | None = None
) -> Plan:
    """Pending work = images x tasks - rows already in the output; refuse changed settings.

    Raises before anything is recorded when the model cannot be resolved (a wrong path, a directory
    without config.json): rows made with a wrong model's fingerprint would block the right one.
    `check` is called per image scanned and may raise (`_StopFlag.check`: a signal while hashing).
    """
    # Pillow warns once per process about odd EXIF blocks; such an image still decodes fine.
    warnings.filterwarnings("ignore", message="(Possibly )?[Cc]orrupt EXIF", category=UserWarning)
    # Above 89 MP Pillow warns on stderr (also under --quiet) for every image; `max_pixels` is the limit here.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    run_id = run_id or new_run_id()
    prepare_output(cfg.output)
    dtype = resolved_dtype(cfg)
    fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in cfg.tasks}
    done = done_keys(cfg.output)
    changed = changed_settings(done, fingerprints)
    registry = SettingsRegistry(cfg.output)
    if changed and not opts.redo_changed:
        raise SettingsChanged(_changed_message(cfg, changed, registry, fingerprints, dtype))

    entries = build_entries(cfg, check)
    requests = expand_requests(entries, cfg, fingerprints)
    # --retry-errors: a pair whose current row is an error counts as not done (its newest row will be the retry's)
    open_requests = pending(requests, done_keys(cfg.output, include_errors=False) if opts.retry_errors else done,
                            opts.redo_changed)  # fmt: skip
    todo = limit_images(open_requests, cfg.limit)
    if todo:
        check_model(cfg)
    registry.record({fingerprints[t.name]: {**cfg.fingerprint_fields(t), "dtype": dtype} for t in cfg.tasks})
    write_resolved_config(cfg)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "output": str(cfg.output),
        "model": cfg.model,
        "quant": cfg.quantization.label(),
        "images": len({e.image_id for e in entries}),
        "requests_total": len(requests),
        "skipped": len(requests) - len(open_requests),
        "pending": len(todo),
        "done": 0,
        "failed": 0,
        "generated_tokens": 0,
        "model_loaded": False,
    }
    if not entries:  # a typo in the folder's extensions looks like a finished run otherwise
        summary["message"] = f"nothing to do: {_no_images(cfg)}"
    elif not todo:
        summary["message"] = "nothing to do: every image and task is already in the output"
    return Plan(run_id, todo, summary)


def _no_images(cfg: JobConfig) -> str:
    inp = cfg.input
    if inp.folder is None:
        return f"the manifest {inp.manifest} has no rows"
    where = "in or under" if inp.recursive else "in"
    exts = ", ".join(f".{e}" for e in inp.extensions) or "none"
    return f"no images {where} {inp.folder} (extensions: {exts})"


def check_model(cfg: JobConfig) -> None:
    """Read the model's config.json (no weights): a model source that cannot work is a config error now.

    Cheap enough to run whenever there is work, also when every pending request is a known error row
    (a missing file) and no model would be loaded: those rows carry the model in their fingerprint.
    A hub id that is not cached fetches its config.json only.
    """
    from cogbatch.model.config import CogVLMConfig
    from cogbatch.model.weights import resolve_checkpoint
    from cogbatch.worker import tiny_model_dir

    try:
        source = (
            tiny_model_dir(cfg)
            if cfg.model.startswith(TINY_PREFIX)
            else resolve_checkpoint(cfg.model, ("config.json",))
        )
        CogVLMConfig.from_json(source)
    except ConfigError as e:
        raise ConfigError(f"model: {cfg.model}: {e}") from None


def check_device(cfg: JobConfig) -> None:
    """`device: cuda` on a machine without a usable CUDA device is the user's to fix, before any work."""
    if not cfg.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device: {cfg.device} was asked for, but torch sees no CUDA device here "
            f"(torch {torch.__version__}); use device: cpu or auto"
        )
    index = int(cfg.device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device: {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_output(cfg: JobConfig) -> None:
    """The output directory must exist or be creatable, and be writable: else exit 2, not a crash later."""
    try:
        cfg.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output: cannot create {cfg.output} ({e.strerror or e})") from None
    if not os.access(cfg.output, os.W_OK | os.X_OK):
        raise ConfigError(f"output: {cfg.output} is not writable")


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
    A device or output that cannot work raises `ConfigError` before the lock is taken.
    """
    from cogbatch.lock import run_exclusive

    check_output(cfg)
    check_device(cfg)
    return run_exclusive(cfg, lambda _holder: _run_locked(cfg, options))


def _run_locked(cfg: JobConfig, options: RunOptions | None = None) -> dict[str, Any]:
    """The run itself, under the output's lock (see `run`).

    Signals are caught from the start: one during the input scan ends the run with nothing done (exit
    130 / 143); one later finishes the batch in flight. An exception carries the run id to the history.
    """
    opts = options or RunOptions()
    started = time.time()
    run_id = new_run_id()
    try:
        with _StopFlag() as stop:
            try:
                plan = plan_run(cfg, opts, stop.check, run_id)
            except Interrupted as e:
                return _stopped_before_work(cfg, run_id, started, e.signum, opts)
            plan.summary["plan_s"] = round(time.time() - started, 3)  # input scan, hashing, done set
            progress = _Progress(len(plan.todo), opts.quiet, len(_ids(plan.todo)))
            writer = PartWriter(cfg.output, run_id, flush_rows=cfg.flush_rows, flush_seconds=cfg.flush_seconds)
            try:
                with writer:
                    _process(cfg, plan.todo, writer, progress, plan.summary, stop, run_id)
            finally:
                progress.close()
    except BaseException as e:
        with contextlib.suppress(AttributeError, TypeError):
            e.cogbatch_run_id = run_id  # type: ignore[attr-defined]  # the history line names the run that raised
        raise
    plan.summary["parts_written"] = len(writer.parts_written)
    return finish_summary(plan.summary, plan, started, stop.signum, opts)


def _stopped_before_work(cfg: JobConfig, run_id: str, started: float, signum: int, opts: RunOptions) -> dict:
    """The summary of a run a signal stopped while it was still scanning the input."""
    summary: dict[str, Any] = {
        "run_id": run_id,
        "output": str(cfg.output),
        "model": cfg.model,
        "quant": cfg.quantization.label(),
        "images": 0,
        "requests_total": 0,
        "skipped": 0,
        "pending": 0,
        "done": 0,
        "failed": 0,
        "generated_tokens": 0,
        "model_loaded": False,
        "parts_written": 0,
        "message": "interrupted while scanning the input: nothing was done (the hashes so far are kept)",
    }
    return finish_summary(summary, Plan(run_id, [], summary), started, signum, opts)


def _process(cfg, todo, writer, progress, summary, stop, run_id) -> None:
    """The model first, so that a model or ceiling that cannot work raises before any row is written
    (exit 2 means nothing was done); then the rows known to be errors (missing file, no question);
    then the decoded images, through the worker."""
    if stop.signum is not None:  # a signal during the scan or the pending computation
        return
    known = [r for r in todo if r.image.error or r.error]
    runnable = [r for r in todo if not (r.image.error or r.error)]
    worker = None
    if runnable:
        t0 = time.perf_counter()
        worker = Worker(cfg, run_id)
        summary["model_load_s"] = round(time.perf_counter() - t0, 3)  # imports, weights, tokenizer, plan
        summary["model_loaded"] = True
        summary["model_load"] = worker.load_report()
        if cfg.model.startswith(TINY_PREFIX):
            log.warning("NOTE: %s has random weights: its text is random (a smoke run, not captions)", cfg.model)
    if stop.signum is not None:
        return
    for r in known:
        writer.add(error_row(r, r.image.error or r.error, cfg, run_id))
        summary["failed"] += 1
    if known:
        progress.update(len(known), len(known), len(_ids(known) - _ids(runnable)))  # images with no other work
    if worker is not None:
        _generate(cfg, worker, runnable, writer, progress, summary, stop)


def _ids(requests: list[Request]) -> set[str]:
    """The distinct images of some requests."""
    return {r.image.image_id for r in requests}


def _generate(cfg, worker: Worker, runnable: list[Request], writer, progress, summary, stop) -> None:
    """Decoded images, a chunk at a time, through the worker; rows to the writer as they come."""
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
        progress.update(len(rows), len(rows) - ok, len(chunk))
        chunk.clear()

    # One chunk decoding ahead while the model works on the current one (the window bounds host memory:
    # a CogVLM2 image is 21.7 MB of float32 pixels and chunks hold up to 64 images).
    for img in prefetch(images, cfg, worker.image_size, worker.chunk_images + 2 * cfg.loader_threads):
        if stop.signum is not None:
            break
        chunk.append((img, by_image[img.entry.image_id]))
        if len(chunk) >= worker.chunk_images:
            flush()
    if stop.signum is None and chunk:
        flush()
    summary["generated_tokens"] = int(worker.stats["generated_tokens"])
    summary.update(worker.summary_stats())
    device = getattr(worker.model, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        summary["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))


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

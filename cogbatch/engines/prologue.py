"""The run every engine shares: checks before any work, the output's lock, the pending work, the summary.

    summary = run_engine(cfg, options, execute, preflight=(check_device, check_new_output_model, check_output))

An engine only supplies `execute(run)`: the pending requests in, rows written, counts on `run.summary`.
Everything else happens here, identically for the local and the Ray engine: one run per output at a
time (`lock.run_exclusive`, which also appends the run to `runs.jsonl`), signals caught from the start
(one during the input scan ends the run with nothing done, exit 130 / 143; one later finishes the
batch in flight), settings changed since earlier rows refused, the model's config.json checked before
any row is written, and the summary's timings and exit code.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cogbatch.engines.progress import Progress, StopFlag
from cogbatch.errors import EXIT_OK, EXIT_ROW_ERRORS, EXIT_SIGNAL, ConfigError, Interrupted, SettingsChanged
from cogbatch.fsio import atomic_write
from cogbatch.inputs.entries import never_stop
from cogbatch.inputs.pending import PendingWork, Request, changed_settings, find_pending
from cogbatch.job.config import JobConfig
from cogbatch.logs import quiet_known_warnings
from cogbatch.results import RunSummary
from cogbatch.store import done_keys, prepare_output
from cogbatch.store.settings import SettingsRegistry


@dataclass
class RunOptions:
    redo_changed: bool = False  # redo tasks whose rows were made with other settings
    retry_errors: bool = False  # redo image/task pairs whose current row is an error
    fail_on_error: bool = False  # exit 3 when any image ended as an error row
    quiet: bool = False  # errors only: no progress, no notes
    verbose: bool = False  # also the model loader's internals, and Ray's own logs


@dataclass
class Run:
    """What an engine's `execute` works on; it adds its counts to `summary`."""

    cfg: JobConfig
    options: RunOptions
    run_id: str
    holder: dict[str, Any]  # this process's entry in the output's run lock
    todo: list[Request]  # pending requests, in order, after --limit
    summary: RunSummary
    stop: StopFlag
    progress: Progress


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_engine(
    cfg: JobConfig,
    options: RunOptions,
    execute: Callable[[Run], None],
    preflight: Sequence[Callable[[JobConfig], None]] = (),
) -> RunSummary:
    """Run `execute` under the output's lock and return the run's summary (`exit_code` says how it ended).

    `preflight` checks run first, before the lock is taken: what they refuse (an output that cannot be
    written, a device that is not there, a missing extra) is a user error, and nothing is done.
    Raises JobLocked at once when another run holds the output.
    """
    from cogbatch.lock import run_exclusive

    for check in preflight:
        check(cfg)
    return run_exclusive(cfg, lambda holder: _run_locked(cfg, options, holder, execute))


def _run_locked(
    cfg: JobConfig, opts: RunOptions, holder: dict[str, Any], execute: Callable[[Run], None]
) -> RunSummary:
    """The run under the lock; an exception carries the run id to the history line."""
    started = time.time()
    run_id = new_run_id()
    try:
        with StopFlag() as stop:
            try:
                work = prepare_run(cfg, opts, stop.check)
            except Interrupted as e:
                summary = RunSummary(run_id, str(cfg.output), cfg.model, cfg.quantization.label())
                summary.message = "interrupted while scanning the input: nothing was done (the hashes so far are kept)"
                return finish(summary, PendingWork(0, 0, 0, []), started, e.signum, opts)
            summary = _start_summary(cfg, run_id, work)
            summary.plan_s = round(time.time() - started, 3)  # input scan, hashing, done set
            progress = Progress((r.image.image_id for r in work.todo), opts.quiet)
            try:
                execute(Run(cfg, opts, run_id, holder, work.todo, summary, stop, progress))
            finally:
                progress.close()
    except BaseException as e:
        with contextlib.suppress(AttributeError, TypeError):
            e.cogbatch_run_id = run_id  # type: ignore[attr-defined]  # the history line names the run that raised
        raise
    return finish(summary, work, started, stop.signum, opts)


def prepare_run(cfg: JobConfig, opts: RunOptions, check: Callable[[], None] = never_stop) -> PendingWork:
    """The pending work of a run; refuses changed settings and a model that cannot work before anything else.

    Raises before anything is recorded when the model cannot be resolved (a wrong path, a directory
    without config.json): rows made with a wrong model's fingerprint would block the right one.
    `check` is called per image scanned and may raise (`StopFlag.check`: a signal while hashing).
    """
    quiet_known_warnings()
    prepare_output(cfg.output)
    dtype = cfg.source.compute_dtype()
    fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in cfg.tasks}
    done = done_keys(cfg.output)
    changed = changed_settings(done, fingerprints)
    registry = SettingsRegistry(cfg.output)
    if changed and not opts.redo_changed:
        raise SettingsChanged(_changed_message(cfg, changed, registry, fingerprints, dtype))
    # --retry-errors: a pair whose current row is an error counts as not done (its newest row will be the retry's)
    open_done = done_keys(cfg.output, include_errors=False) if opts.retry_errors else done
    work = find_pending(cfg, fingerprints, open_done, opts.redo_changed, check)
    if work.todo:
        check_model(cfg)
    registry.record({fingerprints[t.name]: {**cfg.fingerprint_fields(t), "dtype": dtype} for t in cfg.tasks})
    write_resolved_config(cfg)
    return work


def _start_summary(cfg: JobConfig, run_id: str, work: PendingWork) -> RunSummary:
    summary = RunSummary(run_id, str(cfg.output), cfg.model, cfg.quantization.label(), work.images,
                         work.requests_total, work.skipped, len(work.todo))  # fmt: skip
    if not work.images:  # a typo in the folder's extensions looks like a finished run otherwise
        summary.message = f"nothing to do: {_no_images(cfg)}"
    elif not work.todo:
        summary.message = "nothing to do: every image and task is already in the output"
    return summary


def _no_images(cfg: JobConfig) -> str:
    inp = cfg.input
    if inp.folder is None:
        return f"the manifest {inp.manifest} has no rows"
    where = "in or under" if inp.recursive else "in"
    exts = ", ".join(f".{e}" for e in inp.extensions) or "none"
    return f"no images {where} {inp.folder} (extensions: {exts})"


def finish(
    summary: RunSummary, work: PendingWork, started: float, interrupted_by: int | None, opts: RunOptions
) -> RunSummary:
    """Timings, memory and the exit code, the same for every engine."""
    wall = time.time() - started
    summary.wall_s = round(wall, 3)
    summary.images_per_s = round(len(work.image_ids) / wall, 3) if wall else 0.0
    summary.tokens_per_s = round(summary.generated_tokens / wall, 2) if wall else 0.0
    summary.peak_host_rss_bytes = _peak_rss_bytes()
    if interrupted_by is not None:
        summary.exit_code = EXIT_SIGNAL[interrupted_by]
        summary.interrupted = True
    elif opts.fail_on_error and summary.failed:
        summary.exit_code = EXIT_ROW_ERRORS
    else:
        summary.exit_code = EXIT_OK
    return summary


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- checks before any work ----------------------------------------------------------------------


def check_output(cfg: JobConfig) -> None:
    """The output directory must exist or be creatable, and be writable: else exit 2, not a crash later.

    It creates the output, so the engines run it after every other check (`check_new_output_model`
    first): a run refused before any work leaves no new directory behind.
    """
    try:
        cfg.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output: cannot create {cfg.output} ({e.strerror or e})") from None
    if not os.access(cfg.output, os.W_OK | os.X_OK):
        raise ConfigError(f"output: {cfg.output} is not writable")


def check_new_output_model(cfg: JobConfig) -> None:
    """Before a new output is created: the model must be readable, or the failed run leaves a directory behind.

    An existing output is not held to it: a run with nothing pending needs no model (`check_model`).
    """
    if not cfg.output.exists():
        check_model(cfg)


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


def check_model(cfg: JobConfig) -> None:
    """Read the model's config.json (no weights): a model source that cannot work is a config error now.

    Cheap enough to run whenever there is work, also when every pending request is a known error row
    (a missing file) and no model would be loaded: those rows carry the model in their fingerprint.
    A hub id that is not cached fetches its config.json only.
    """
    cfg.source.config()


def write_resolved_config(cfg: JobConfig) -> None:
    """`config.resolved.yaml` beside the output: the settings the rows were made with, after every default."""
    atomic_write(cfg.output / "config.resolved.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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

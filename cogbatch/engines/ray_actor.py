"""The Ray actor: one model per actor, one batch of images per call, one complete part file per batch.

Exactly once on Ray: a batch's rows reach the output only by the atomic rename of its part, so a killed
actor loses at most the batch in flight. Ray restarts a dead actor and retries its batch; a batch that
had written its part before its actor died would then be generated twice, so before generating, each
actor skips requests that a part of this run already holds. A batch whose actor died MAX_BATCH_CRASHES
times becomes error rows, and an actor that was started more than MAX_ACTOR_RESTARTS + 1 times refuses
to load its model again, which ends the run (Ray Data's default is to restart and retry forever).

An actor logs like its driver (`--quiet`, `--verbose`, the same warning filters): Ray forwards what
it prints to the driver's stderr. A warning every actor would give (the model's int4 kernel, its cache)
is given once per run, by the first actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.engines.ray_cluster import MAX_ACTOR_RESTARTS, quiet_ray_warnings
from cogbatch.inputs.entries import ImageEntry
from cogbatch.inputs.manifest import ManifestBytes
from cogbatch.inputs.pending import Request
from cogbatch.job.config import JobConfig
from cogbatch.logs import configure_logging
from cogbatch.store import PartWriter
from cogbatch.testing import faults
from cogbatch.worker.loading import load_entry
from cogbatch.worker.rows import error_row
from cogbatch.worker.worker import ModelWorker

log = logging.getLogger("cogbatch")

# A batch whose actor died this many times (a segfault on one image, the OOM killer) is not tried again:
# its requests become error rows. Also Ray's `max_task_retries`, so Ray gives up no sooner than we do.
MAX_BATCH_CRASHES = 3
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
        ("stats", pa.string()),  # JSON, on a batch's first row: what it added to the worker's counters
    ]
)


class CaptionActor:
    """One model per actor; `__call__` is one batch of images through `ModelWorker.process` into one part file."""

    def __init__(
        self, cfg: JobConfig, run_id: str, cwd: str, holder: dict[str, Any], quiet: bool = False, verbose: bool = False
    ) -> None:
        handler = configure_logging(quiet, verbose, own_process=True)
        if not verbose:
            quiet_ray_warnings()
            handler.addFilter(OncePerRun(attempts_dir(cfg.output, run_id).parent / "said"))
        with contextlib.suppress(OSError):  # relative model / tokenizer paths mean what they meant on the driver
            os.chdir(cwd)
        starts = count_start(attempts_dir(cfg.output, run_id).parent / "actors")
        if starts > MAX_ACTOR_RESTARTS + 1:
            raise RuntimeError(
                f"this Ray actor died {starts - 1} times (more than {MAX_ACTOR_RESTARTS}): not loading the model again"
            )
        self.cfg = cfg
        self.holder = holder  # the driver's entry in the output's run lock
        t0 = time.perf_counter()
        self.worker = ModelWorker(cfg, run_id)  # rows carry the run's id; the part names carry the actor's
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
        self.reported_stats: dict[str, float] = dataclasses.asdict(self.worker.stats)
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
        faults.point("ray-batch", subjects=[Path(entry.path).name for entry, _ in todo])
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
            faults.point("ray-part-written")
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
        """What this batch added to the worker's counters, and the plan the actor runs by."""
        now = dataclasses.asdict(self.worker.stats)
        added = {k: v - self.reported_stats.get(k, 0) for k, v in now.items()}
        self.reported_stats = now
        self.batches_done += 1
        return {
            "actor": self.writer_id,
            "seq": self.batches_done,
            "added": added,
            "plan": {"mode": self.worker.plan.mode, "slots": self.worker.plan.slots},
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


def count_start(directory: Path) -> int:
    """This actor's starts so far, this one included (one file per actor: Ray keeps its id across restarts)."""
    import ray

    actor = ray.get_runtime_context().get_actor_id() or f"pid{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / actor, "a") as f:
        f.write(f"{os.getpid()}\n")
    return (directory / actor).read_text().count("\n")


class OncePerRun(logging.Filter):
    """Lets a message through in the first actor of the run that logs it; errors always pass.

    The actors load the same model with the same settings, so their warnings come N times over; the
    first to log one claims it with a file in the run's directory (exclusive create: every node of the
    cluster sees the output directory).
    """

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.dir = directory

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        claim = self.dir / hashlib.sha256(record.getMessage().encode()).hexdigest()[:24]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        except OSError:  # an output that cannot take the claim: say it, rather than lose it
            return True
        return True


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

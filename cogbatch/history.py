"""Run history: one JSON line per run in `<output>/runs.jsonl`, shown by `cogbatch status --history`.

A nightly job's log tells what happened last night; the history answers "since when did it fail",
"which versions made these rows", "how long does a night take". Each run appends one line when it
ends, however it ends (done, interrupted, aborted), with the exit code the process exits with.

Appends are one `write(2)` of a whole line on an O_APPEND descriptor, under an flock of the file, so
concurrent writers never interleave within a line. A line torn by a crash (power cut mid-write) is
skipped when reading, and the next append starts on a fresh line so it is not glued to the torn one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cogbatch.errors import exit_code_for
from cogbatch.results import RunSummary

try:
    import fcntl
except ImportError:  # Windows: appends are still single O_APPEND writes
    fcntl = None  # type: ignore[assignment]

HISTORY_NAME = "runs.jsonl"
VERSIONED = ("cogbatch", "torch", "transformers", "optimum-quanto")
# Counters of the run summary kept in the history line.
_COUNTS = ("images", "requests_total", "pending", "done", "failed", "skipped", "generated_tokens", "parts_written")


def versions() -> dict[str, str | None]:
    """Installed versions of what makes the text, read from package metadata (nothing is imported)."""
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def outcome_of(exit_code: int) -> str:
    return {0: "ok", 2: "config error", 3: "error rows", 75: "locked", 130: "interrupted", 143: "interrupted"}.get(
        exit_code, "aborted"
    )


def run_record(
    cfg: Any,
    started: float,
    summary: RunSummary | None,
    error: BaseException | None,
    new_parts: dict[str, dict[str, int]] | None = None,
) -> dict[str, Any]:
    """The history line of a run: its summary's counts, or what its new part files hold when it raised."""
    ended = time.time()
    record: dict[str, Any] = {"run_id": None, "started": _iso(started), "ended": _iso(ended)}
    if summary is not None:
        record["run_id"] = summary.run_id
        record.update({k: getattr(summary, k) for k in _COUNTS})
        code = summary.exit_code
        if summary.message:
            record["message"] = summary.message
    else:
        code = exit_code_for(error) if error is not None else 1
        if isinstance(error, KeyboardInterrupt):
            record["message"] = "stopped at once by a second Ctrl-C / signal (run again to resume)"
        elif error is not None:
            record["message"] = f"{type(error).__name__}: {error}"[:2000]
        if new_parts:  # the run wrote parts before it failed: count their rows
            record["run_id"] = next(iter(new_parts)) if len(new_parts) == 1 else ",".join(sorted(new_parts))
            record["done"] = sum(p.get("ok", 0) for p in new_parts.values())
            record["failed"] = sum(p.get("error", 0) for p in new_parts.values())
        record["run_id"] = getattr(error, "cogbatch_run_id", None) or record["run_id"]  # set by the run prologue
    record.update(
        {
            "wall_s": round(ended - started, 3),
            "exit_code": code,
            "outcome": outcome_of(code),
            "model": cfg.model,
            "quant": cfg.quantization.label(),
            "versions": versions(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": str(Path(cfg.path).resolve()) if cfg.path is not None else None,
        }
    )
    return record


def append_record(output: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Append one line to `<output>/runs.jsonl` with a single O_APPEND write."""
    path = Path(output) / HISTORY_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:  # writers take turns, so the torn-line check below sees whole lines only
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            data = b"\n" + data  # the previous writer was cut off mid-line: do not glue onto it
        written = os.write(fd, data)
        while written < len(data):  # a short write to a regular file only happens on a full disk
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read_history(output: str | os.PathLike[str], warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every readable record, oldest first; torn or foreign lines are skipped, never an error.

    `warn` is told about each skipped line ("<file> line N: ...") and an unreadable file, so that
    `status --history` never says "no runs" about a history it could not read.
    """
    path = Path(output) / HISTORY_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:  # a directory of that name, no permission…
        if warn is not None:
            warn(f"cannot read {path}: {e.strerror or e}")
        return []
    records = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif warn is not None:
            warn(f"{path} line {number}: not a run record (cut off by a crash, or edited); skipped")
    return records


def new_part_counts(output: Path, before: set[str]) -> dict[str, dict[str, int]]:
    """run id -> rows by status in the part files that appeared since `before` (an aborted run's work).

    Under the run lock no other run writes parts, so the new parts are this run's; compaction parts
    (run tag `compact-…`) are not a run's work and are left out.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cogbatch.store import list_parts

    counts: dict[str, dict[str, int]] = {}
    for part in list_parts(output):
        if part.name in before:
            continue
        run_id = part.name.removeprefix("part-").rsplit("-", 1)[0]  # part-<run id>-<seq>.parquet
        if run_id.startswith("compact-"):
            continue
        try:
            status = pq.read_table(part, columns=["status"])["status"]
        except Exception:  # vanished or unreadable: the history line is best effort
            continue
        by = counts.setdefault(run_id, {})
        for value in pc.value_counts(status).to_pylist():
            by[value["values"]] = by.get(value["values"], 0) + value["counts"]
    return counts


def part_names(output: Path) -> set[str]:
    try:
        return set(os.listdir(output))
    except FileNotFoundError:
        return set()


def record_run(
    cfg: Any, started: float, before: set[str], summary: RunSummary | None, error: BaseException | None
) -> None:
    """Append the run's line; never let a history problem (read-only disk…) hide the run's own outcome."""
    import logging

    try:
        new_parts = new_part_counts(cfg.output, before) if summary is None else None
        append_record(cfg.output, run_record(cfg, started, summary, error, new_parts))
    except Exception as e:  # the run's result matters more than its history line
        logging.getLogger("cogbatch").warning("could not append to %s: %s", Path(cfg.output) / HISTORY_NAME, e)


def format_table(records: list[dict[str, Any]]) -> str:
    """The history as an aligned text table, oldest first (what `status --history` prints)."""
    header = ("run_id", "started", "wall", "exit", "outcome", "done", "failed", "skipped", "model", "quant")
    rows = [header]
    for r in records:
        wall = r.get("wall_s")
        rows.append(
            (
                str(r.get("run_id") or "-"),
                str(r.get("started") or "-"),
                f"{wall:.0f}s" if isinstance(wall, int | float) else "-",
                str(r.get("exit_code", "-")),
                str(r.get("outcome") or "-"),
                str(r.get("done", "-")),
                str(r.get("failed", "-")),
                str(r.get("skipped", "-")),
                str(r.get("model") or "-"),
                str(r.get("quant") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)

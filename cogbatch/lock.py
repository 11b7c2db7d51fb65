"""One run per output dataset at a time, whoever starts it: cron, a user at a terminal, a notebook.

Two runs on one output would both compute the same pending set and caption every image twice (each
writes complete parts, so nothing breaks, but the work and the duplicate rows are wasted). The lock
is an exclusive flock(2) on `<output>/.cogbatch/run.lock`, taken without waiting: a second run fails
at once with `JobLocked` (the CLI exits 75, EX_TEMPFAIL, "try again later").

The kernel releases a flock when its process dies, however it dies, so a lock can never outlive its
holder on the same machine. A JSON sidecar (`run.lock.json`) names the holder (pid, host, start time,
command) for the message a second run prints. A sidecar found while the lock is free was left by a
run that was killed (kill -9, power cut): the new run takes over and warns, since the dead run's
last batch was lost and will be redone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; the sidecar alone guards, checked by pid (same host only)
    fcntl = None  # type: ignore[assignment]

from cogbatch.errors import JobLocked, describe_holder
from cogbatch.fsio import atomic_write
from cogbatch.results import RunSummary

log = logging.getLogger("cogbatch")

LOCK_DIR = ".cogbatch"
LOCK_NAME = "run.lock"
INFO_NAME = "run.lock.json"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a pid we may not signal still exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_info(path: Path, info: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(info, indent=1))


def holder_info(command: str | None = None) -> dict[str, Any]:
    """What a waiting run (or a user) needs to find this process."""
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": started,
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def _stale_warning(output: Path, old: dict[str, Any]) -> None:
    same_host = old.get("host") == socket.gethostname()
    state = "no longer running" if same_host and not pid_alive(int(old.get("pid") or 0)) else "gone"
    log.warning(
        "taking over the lock of %s from a run that did not finish cleanly (%s; %s): its last batch is redone",
        output,
        describe_holder(old),
        state,
    )


@contextlib.contextmanager
def job_lock(output: str | os.PathLike[str], command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the run lock of `output` for the duration of the block; raises JobLocked at once when taken.

    Yields the holder info written to the sidecar. Released (sidecar removed first) when the block
    ends, whether it returns or raises.
    """
    out = Path(output)
    directory = out / LOCK_DIR
    directory.mkdir(parents=True, exist_ok=True)
    info_path = directory / INFO_NAME
    with open(directory / LOCK_NAME, "a+b") as f:
        _acquire(f, out, info_path)
        try:
            old = _read_info(info_path)
            if old is not None and old.get("pid") != os.getpid():
                _stale_warning(out, old)
            info = holder_info(command)
            _write_info(info_path, info)
            try:
                yield info
            finally:
                with contextlib.suppress(FileNotFoundError):
                    info_path.unlink()
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _acquire(f: IO[bytes], out: Path, info_path: Path) -> None:
    if fcntl is None:  # no flock: trust the sidecar when its process still lives on this host
        old = _read_info(info_path) or {}
        pid = int(old.get("pid") or 0)
        if old.get("host") == socket.gethostname() and pid != os.getpid() and pid_alive(pid):
            raise JobLocked(out, old)
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JobLocked(out, _wait_for_info(info_path)) from None


def _wait_for_info(info_path: Path, timeout: float = 1.0) -> dict[str, Any] | None:
    """The holder's sidecar; a holder that has just taken the lock may not have written it yet."""
    deadline = time.monotonic() + timeout
    while True:
        info = _read_info(info_path)
        if info is not None or time.monotonic() >= deadline:
            return info
        time.sleep(0.05)


def current_holder(output: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run holding `output`'s lock now as far as its sidecar tells, or None (for `status`).

    Read-only on purpose: probing the flock itself, even for a moment, could make a run starting at
    that instant find the lock taken and exit 75. A sidecar of a dead pid on this host is stale: None.
    """
    info = _read_info(Path(output) / LOCK_DIR / INFO_NAME)
    if not info or not info.get("pid"):
        return None
    if info.get("host") == socket.gethostname() and not pid_alive(int(info["pid"])):
        return None
    return info


def run_exclusive(cfg: Any, body: Callable[[dict[str, Any]], RunSummary]) -> RunSummary:
    """Run `body(holder)` (an engine's whole run, returning its summary) under `cfg.output`'s lock, and
    append the run's line to `<output>/runs.jsonl` however it ends (`cogbatch.history`).

    Every engine (local, Ray) goes through here, so "one run per output" and the history do
    not depend on how a run was started. Raises JobLocked, before doing anything, when another run
    holds the output.
    """
    from cogbatch.history import part_names, record_run

    with job_lock(cfg.output) as holder:
        started, before = time.time(), part_names(cfg.output)
        summary, error = None, None
        try:
            summary = body(holder)
        except BaseException as e:
            error = e
            raise
        finally:
            record_run(cfg, started, before, summary, error)
    return summary

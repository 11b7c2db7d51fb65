"""Getting an output ready for a run or a compaction: an old layout migrated, crashed processes cleaned up after.

`prepare_output` moves the state files of the layout before the state directory (`store.state.LEGACY`:
config, history, hash cache, settings, locks, journal, cron log, temp files, all inside the output) into
`<output>.cogbatch/`, finishes or rolls back the journal of a crashed compaction, and deletes the temp
files of crashed writers. Each move is one rename (or a write of the merged file before the old one is
deleted), so a crash in the middle loses nothing and the next run finishes the migration.

Live writers and compactions hold an exclusive flock on their temp files and on the compaction lock, so
`prepare_output` run beside them removes only what crashed processes left (where fcntl exists; elsewhere
run it only when nothing else writes to the output).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from cogbatch.errors import JobLocked
from cogbatch.fsio import TEMP_PATTERN, atomic_write, fsync_dir
from cogbatch.store.parts import is_part_name, journal_complete, read_journal
from cogbatch.store.state import (
    COMPACT_LOCK,
    CONFIG,
    CRON_LOCK,
    CRON_LOG,
    HASHES,
    HISTORY,
    JOURNAL,
    LEGACY,
    LEGACY_DIR,
    RAY,
    RUN_LOCK,
    RUN_LOCK_INFO,
    SETTINGS,
    TMP,
    ensure_state_dir,
    legacy_file,
    state_dir,
)
from cogbatch.testing import faults

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; prepare_output then assumes it runs alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("cogbatch")

# State files an old layout kept inside the output that are moved (the others only served live processes).
_MOVED = (CONFIG, HISTORY, CRON_LOG, HASHES, SETTINGS)
_DROPPED = (RUN_LOCK_INFO, CRON_LOCK, COMPACT_LOCK)


@contextlib.contextmanager
def flock_file(path: Path, *, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if missing); yields False when not blocking and it is taken.

    The kernel drops a flock when its process dies, so a held lock means a live process and a free lock
    with a journal on disk means a crashed one.
    """
    with open(path, "a+b") as f:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def compact_lock(output: Path, *, blocking: bool) -> contextlib.AbstractContextManager[bool]:
    return flock_file(ensure_state_dir(output) / COMPACT_LOCK, blocking=blocking)


def unlink_all(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    fsync_dir(directory)


def resolve_journal(output: Path, journal: Path) -> None:
    """Finish (all new parts exist) or roll back (some missing) the journal of a dead compaction.

    Each step is made durable before the next: the losing side of the parts is deleted and the output
    fsynced before the journal goes, or a power cut could leave both sides and no journal to choose.
    """
    entry = read_journal(output, journal)
    if entry is None:
        return
    names = set(os.listdir(output))
    unlink_all(output, entry["old"] if journal_complete(entry, names) else entry["new"])
    unlink_all(journal.parent, [journal.name])


def remove_dead_temps(directory: Path) -> None:
    """Delete temp files of crashed writers; a live writer's temp file is flocked and left alone."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if not TEMP_PATTERN.match(name):
            continue
        try:
            with open(directory / name, "rb") as f:
                if fcntl is not None:
                    try:
                        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                (directory / name).unlink()
        except FileNotFoundError:  # renamed or removed meanwhile by its writer
            continue


def is_output(directory: Path) -> bool:
    """Whether `directory` is a cogbatch output: it holds parts, or has state (beside it, or of the old layout)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if any(is_part_name(n) for n in names) or state_dir(directory).is_dir():
        return True
    return any(os.path.lexists(directory / rel) for rel in LEGACY.values())


def prepare_output(output_dir: str | os.PathLike[str]) -> None:
    """Make the output directory ready for a run: create it and its state directory, migrate an old layout,
    clean up after crashed processes.

    Run it before writing or reading for resume. It removes only names cogbatch writes: dead temp files
    (`.tmp-*`) and the losing side of a crashed compaction; a live compaction is left to finish.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    state = ensure_state_dir(output)
    migrate_legacy(output)
    with compact_lock(output, blocking=False) as locked:
        if locked:
            resolve_journal(output, state / JOURNAL)
    for directory in (state / TMP, state, output):  # `output`: temps of a mount-point output (`part_temp_dir`)
        remove_dead_temps(directory)


# -- the layout before the state directory -------------------------------------------------------


def has_legacy_state(output: Path) -> bool:
    if any(os.path.lexists(output / rel) for rel in LEGACY.values()):
        return True
    try:
        return any(TEMP_PATTERN.match(n) for n in os.listdir(output))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _legacy_locks(output: Path) -> Iterator[None]:
    """Hold the old layout's run and compaction locks: JobLocked while an older cogbatch still holds one."""
    with contextlib.ExitStack() as stack:
        for name in (RUN_LOCK, COMPACT_LOCK):
            path = legacy_file(output, name)
            if path is None or not path.is_file():
                continue
            if not stack.enter_context(flock_file(path, blocking=False)):
                info = None
                with contextlib.suppress(OSError, ValueError):
                    info = json.loads(legacy_file(output, RUN_LOCK_INFO).read_text())
                raise JobLocked(output, info if isinstance(info, dict) else None)
        yield


def migrate_legacy(output: Path) -> bool:
    """Move an old layout's state out of `output` into its state directory; True when there was any.

    Order matters for a crash in the middle: a crashed compaction's journal is resolved first (it names the
    parts), then dead temp files go, then each state file moves by one rename; the locks of the old layout
    go last, while held (an older cogbatch still running on this output: JobLocked, nothing moved).
    """
    if not has_legacy_state(output):
        return False
    state = ensure_state_dir(output)
    with _legacy_locks(output):
        journal = legacy_file(output, JOURNAL)
        resolve_journal(output, journal)
        remove_dead_temps(output)
        for name in _MOVED:
            _move(legacy_file(output, name), state / name)
            faults.point("state-moved", subjects=[name])
        shutil.rmtree(legacy_file(output, RAY), ignore_errors=True)  # notes of dead runs of the old layout
        for name in (*_DROPPED, RUN_LOCK):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                legacy_file(output, name).unlink()
    with contextlib.suppress(FileNotFoundError):
        remaining = os.listdir(output / LEGACY_DIR)
        if remaining:
            log.warning("%s holds files cogbatch did not write (%s): left where they are", output / LEGACY_DIR,
                        ", ".join(sorted(remaining)[:5]))  # fmt: skip
        else:
            (output / LEGACY_DIR).rmdir()
    fsync_dir(state)
    fsync_dir(output)
    log.info("moved the state files of %s to %s (the output now holds result parts only)", output, state)
    return True


def _move(src: Path, dst: Path) -> None:
    """One state file to its new place; when both exist (an older cogbatch ran again), they are merged."""
    if not os.path.lexists(src):
        return
    if not os.path.lexists(dst):
        try:
            os.replace(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:  #: the output is a mount point; copy, then delete
                raise
            atomic_write(dst, src.read_bytes())
            src.unlink()
        return
    if dst.name == HISTORY:  # older lines first; lines already moved by an interrupted merge are not repeated
        have = dst.read_bytes()
        known = set(have.splitlines())
        older = [line for line in src.read_bytes().splitlines() if line.strip() and line not in known]
        if older:
            atomic_write(dst, b"".join(line + b"\n" for line in older) + have)
    elif dst.name == CRON_LOG:  # a cron line of an older cogbatch still logs into the output
        log.warning("%s: a crontab entry of an older cogbatch writes there; install it again with "
                    "`cogbatch schedule JOB --cron EXPR --install` (it now logs to %s)", src, dst)  # fmt: skip
        have, old = dst.read_bytes(), src.read_bytes()
        if not have.startswith(old):
            atomic_write(dst, old + have)
    elif dst.name == SETTINGS:  # fingerprint -> settings: the union
        with contextlib.suppress(OSError, ValueError):
            merged = {**json.loads(src.read_text()), **json.loads(dst.read_text())}
            atomic_write(dst, json.dumps(merged, indent=1, sort_keys=True))
    src.unlink()  # the config and the hash cache: the state directory's copy is the newer one

"""Recovery after crashes and compaction: many small parts replaced by few, crash-safe, rows unchanged.

Compaction writes a journal (old names, new names) before anything else; `list_parts` resolves it,
and `prepare_output` finishes or rolls back the journal of a crashed compaction. Live writers and
compactions hold an exclusive flock on their temp files and on `.compact.lock`, so `prepare_output`
run beside them removes only what crashed processes left (where fcntl exists; elsewhere run it only
when nothing else writes to the directory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.fsio import TEMP_PATTERN, atomic_file, atomic_write, fsync_dir
from cogbatch.store.parts import COMPRESSION, JOURNAL, journal_complete, list_parts, read_journal
from cogbatch.store.read import part_rows, read_part
from cogbatch.store.schema import RESULT_SCHEMA
from cogbatch.testing import faults

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; prepare_output then assumes it runs alone
    fcntl = None  # type: ignore[assignment]

# Compacted parts are written in row groups of this size, so compaction of many tiny parts holds this
# many rows in memory at a time instead of a whole output part.
_COMPACT_ROW_GROUP = 128 * 1024
_LOCK = ".compact.lock"


@contextlib.contextmanager
def _compact_lock(directory: Path, *, blocking: bool) -> Iterator[bool]:
    """Hold `.compact.lock`; yields False when not blocking and another process holds it.

    The kernel drops a flock when its process dies, so a held lock means a live compaction and a free
    lock with a journal on disk means a crashed one.
    """
    with open(directory / _LOCK, "a+b") as f:
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


def _unlink_all(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    fsync_dir(directory)


def _resolve_journal(directory: Path) -> None:
    """Finish (all new parts exist) or roll back (some missing) the journal of a dead compaction.

    Each step is made durable before the next: the losing side of the parts is deleted and the directory
    fsynced before the journal goes, or a power cut could leave both sides and no journal to choose.
    """
    journal = read_journal(directory)
    if journal is None:
        return
    names = set(os.listdir(directory))
    _unlink_all(directory, journal["old"] if journal_complete(journal, names) else journal["new"])
    _unlink_all(directory, [JOURNAL])


def _remove_dead_temps(directory: Path) -> None:
    """Delete temp files of crashed writers; a live writer's temp file is flocked and left alone."""
    for name in os.listdir(directory):
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


def prepare_output(output_dir: str | os.PathLike[str]) -> None:
    """Make the output directory ready for a run: create it, clean up after crashed processes.

    Run it before writing or reading for resume. It removes only names this module writes: dead temp
    files (`.tmp-*`) and the losing side of a crashed compaction; a live compaction is left to finish.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with _compact_lock(directory, blocking=False) as locked:
        if locked:
            _resolve_journal(directory)
    _remove_dead_temps(directory)


class _RowStream:
    """The rows of some parts, in order, handed out in slices of any size without reading ahead."""

    def __init__(self, paths: list[Path]) -> None:
        self._tables = (read_part(p) for p in paths)
        self._pending = RESULT_SCHEMA.empty_table()

    def take(self, n: int) -> Iterator[pa.Table]:
        while n > 0:
            if self._pending.num_rows == 0:
                nxt = next(self._tables, None)
                if nxt is None:
                    return
                self._pending = nxt
                continue
            chunk = self._pending.slice(0, n)
            self._pending = self._pending.slice(chunk.num_rows)
            n -= chunk.num_rows
            yield chunk


def _write_part(path: Path, stream: _RowStream, n_rows: int) -> int:
    """The next `n_rows` rows of `stream` as the complete part `path`; returns how many rows it got."""
    written = 0
    with atomic_file(path) as f, pq.ParquetWriter(f, RESULT_SCHEMA, compression=COMPRESSION) as writer:
        buffered: list[pa.Table] = []
        size = 0
        for chunk in stream.take(n_rows):
            buffered.append(chunk)
            size += chunk.num_rows
            written += chunk.num_rows
            if size >= _COMPACT_ROW_GROUP:  # one row group per write: batch tiny parts into big groups
                writer.write_table(pa.concat_tables(buffered))
                buffered, size = [], 0
        if buffered:
            writer.write_table(pa.concat_tables(buffered))
    return written


def compact(output_dir: str | os.PathLike[str], *, target_rows: int = 1_000_000) -> tuple[int, int]:
    """Merge all parts into ceil(rows / target_rows) balanced parts; returns (parts before, parts after).

    Many small parts make every scan pay per-file costs; compaction keeps the same multiset of rows in the
    same order (so `latest_rows` ties resolve the same way). Does nothing when it would not reduce the
    part count. Crash-safe protocol: journal (old names, new names) written atomically first; then new
    parts, each atomic; then old parts deleted; then the journal. Parts written meanwhile by a PartWriter
    are not in the journal and are left as they are.
    """
    if target_rows < 1:
        raise ValueError(f"target_rows must be >= 1, got {target_rows}")
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with _compact_lock(directory, blocking=True):
        _resolve_journal(directory)  # a crashed compaction first: its parts must not be compacted twice
        old = list_parts(directory)
        total = sum(part_rows(p) for p in old)  # every part checked before anything is written
        n_new = math.ceil(total / target_rows)
        if n_new >= len(old):
            return len(old), len(old)
        tag = f"compact-{uuid.uuid4().hex[:12]}"
        new = [directory / f"part-{tag}-{i:05d}.parquet" for i in range(n_new)]
        journal = {"version": 1, "old": [p.name for p in old], "new": [p.name for p in new]}
        atomic_write(directory / JOURNAL, json.dumps(journal, indent=1))
        faults.point("compact-journal-written")
        try:
            stream, written = _RowStream(old), 0
            for i, path in enumerate(new):  # balanced: sizes differ by at most one row, none is empty
                written += _write_part(path, stream, total // n_new + (1 if i < total % n_new else 0))
            if written != total or next(stream.take(1), None) is not None:
                raise RuntimeError(f"compaction of {directory} read {written} rows, metadata said {total}")
        except BaseException:
            _unlink_all(directory, journal["new"])  # roll back: the old parts are still all there
            _unlink_all(directory, [JOURNAL])
            raise
        faults.point("compact-new-written")
        _unlink_all(directory, journal["old"])
        _unlink_all(directory, [JOURNAL])
    return len(old), len(new)

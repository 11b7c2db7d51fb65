"""Compaction: many small parts replaced by few, crash-safe, rows unchanged.

Compaction writes a journal (old names, new names) into the output's state directory before anything
else; `list_parts` resolves it, and `prepare_output` finishes or rolls back the journal of a crashed
compaction. A compaction holds the state directory's `compact.lock` (flock), so recovery can tell a live
compaction from a crashed one.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.fsio import atomic_file, atomic_write
from cogbatch.store.parts import COMPRESSION, list_parts
from cogbatch.store.prepare import compact_lock, migrate_legacy, resolve_journal, unlink_all
from cogbatch.store.read import part_rows, read_part
from cogbatch.store.schema import RESULT_SCHEMA
from cogbatch.store.state import JOURNAL, part_temp_dir, state_file
from cogbatch.testing import faults

# Compacted parts are written in row groups of this size, so compaction of many tiny parts holds this
# many rows in memory at a time instead of a whole output part.
_COMPACT_ROW_GROUP = 128 * 1024


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


def _write_part(path: Path, stream: _RowStream, n_rows: int, temp_dir: Path) -> int:
    """The next `n_rows` rows of `stream` as the complete part `path`; returns how many rows it got."""
    written = 0
    with (
        atomic_file(path, temp_dir=temp_dir) as f,
        pq.ParquetWriter(f, RESULT_SCHEMA, compression=COMPRESSION) as writer,
    ):
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
    migrate_legacy(directory)  # an old layout's journal names parts: resolved before anything is listed
    journal_file = state_file(directory, JOURNAL)
    temp_dir = part_temp_dir(directory)
    with compact_lock(directory, blocking=True):
        resolve_journal(directory, journal_file)  # a crashed compaction first: its parts must not be compacted twice
        old = list_parts(directory)
        total = sum(part_rows(p) for p in old)  # every part checked before anything is written
        n_new = math.ceil(total / target_rows)
        if n_new >= len(old):
            return len(old), len(old)
        tag = f"compact-{uuid.uuid4().hex[:12]}"
        new = [directory / f"part-{tag}-{i:05d}.parquet" for i in range(n_new)]
        journal = {"version": 1, "old": [p.name for p in old], "new": [p.name for p in new]}
        atomic_write(journal_file, json.dumps(journal, indent=1))
        faults.point("compact-journal-written")
        try:
            stream, written = _RowStream(old), 0
            for i, path in enumerate(new):  # balanced: sizes differ by at most one row, none is empty
                written += _write_part(path, stream, total // n_new + (1 if i < total % n_new else 0), temp_dir)
            if written != total or next(stream.take(1), None) is not None:
                raise RuntimeError(f"compaction of {directory} read {written} rows, metadata said {total}")
        except BaseException:
            unlink_all(directory, journal["new"])  # roll back: the old parts are still all there
            unlink_all(journal_file.parent, [journal_file.name])
            raise
        faults.point("compact-new-written")
        unlink_all(directory, journal["old"])
        unlink_all(journal_file.parent, [journal_file.name])
    return len(old), len(new)

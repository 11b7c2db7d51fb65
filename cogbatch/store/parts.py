"""Part files: the writer that makes them (each complete and atomic) and the listing that says which hold the dataset.

An output directory is a plain Parquet dataset that pyarrow, pandas, polars and DuckDB read as is:

    part-<run_id>-<seq>.parquet      complete part files, each written once and never modified
    .tmp-<final name>.<hex>          a file being written (or left by a crashed writer); never read
    .compact-journal.json            present only while a compaction runs or after one crashed
    .compact.lock                    flock(2) taken by compaction, so recovery can tell live from crashed

Exactly once: rows enter the dataset only by the atomic rename of a complete, fsynced part file
(`cogbatch.fsio`), so a crash loses at most the rows still buffered, never half a file. While a
compaction's journal exists, `list_parts` picks the side it says is current, so no reader sees a row
twice or misses one.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.fsio import atomic_file
from cogbatch.store.schema import RESULT_SCHEMA, make_row
from cogbatch.testing import faults

# zstd: captions compress well and every reader we target (pyarrow, polars, DuckDB, Spark) decodes it.
COMPRESSION = "zstd"
PART_PATTERN = re.compile(r"^part-(?P<run>.+)-(?P<seq>\d{5,})\.parquet$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
JOURNAL = ".compact-journal.json"


class PartWriter:
    """Buffers rows; every flush writes one complete part file atomically.

    Parts are the unit of durability: a crash loses the buffered rows, which the next run redoes
    because they are not in the done set. `flush_rows` bounds that loss and the part count; the time
    limit bounds how long a finished result waits when rows come slowly. The clock is checked on `add`
    only (no background thread): a caller idle for long should call `flush` itself.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        run_id: str,
        *,
        flush_rows: int = 256,
        flush_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id {run_id!r} must be letters, digits, '_', '.', '-' (it names files)")
        if flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {flush_rows}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._last_flush = clock()
        self._buffer: list[dict[str, Any]] = []
        self._closed = False
        self.rows_written = 0
        self.parts_written: list[Path] = []
        # Continue after parts this run id already has, so a second writer object never overwrites one.
        names = map(PART_PATTERN.match, os.listdir(self.output_dir))
        seqs = [int(m["seq"]) for m in names if m and m["run"] == run_id]
        self._seq = max(seqs, default=-1) + 1

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one row (validated now, see `make_row`); flush when the buffer is full or old enough."""
        if self._closed:
            raise ValueError("PartWriter is closed")
        self._buffer.append(make_row(**row))
        if len(self._buffer) >= self.flush_rows or self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self, before_rename: Callable[[], None] | None = None) -> Path | None:
        """Write the buffered rows as one part; the path, or None when nothing was buffered.

        On failure (disk full…, or `before_rename` raising) the rows stay buffered and no file is
        left, so the flush can be retried.
        """
        self._last_flush = self._clock()
        if not self._buffer:
            return None
        table = pa.Table.from_pylist(self._buffer, schema=RESULT_SCHEMA)
        final = self.output_dir / f"part-{self.run_id}-{self._seq:05d}.parquet"
        if final.exists():  # only another writer with the same run id can get here: refuse, never overwrite
            raise FileExistsError(f"{final} exists; two writers share run_id {self.run_id!r}")

        def last_word() -> None:
            faults.point("part-temp-written")
            if before_rename is not None:
                before_rename()

        with atomic_file(final, before_rename=last_word) as f:
            pq.write_table(table, f, compression=COMPRESSION)
        faults.point("part-renamed")
        self._seq += 1
        self.rows_written += len(self._buffer)
        self.parts_written.append(final)
        self._buffer.clear()
        return final

    def close(self) -> None:
        """Flush what is buffered. Idempotent."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Buffered rows are complete results even when the caller failed: keep them.
        self.close()


def _part_sort_key(path: Path) -> tuple[str, int]:
    m = PART_PATTERN.match(path.name)
    assert m is not None
    return m["run"], int(m["seq"])  # numeric seq: part 100000 comes after part 99999


def read_journal(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / JOURNAL).read_text())
    except FileNotFoundError:
        return None


def journal_complete(journal: dict[str, Any], names: set[str]) -> bool:
    return all(name in names for name in journal["new"])


def list_parts(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete part files that hold the dataset now, sorted by (run id, sequence number).

    While a compaction's journal exists its old and new parts are both on disk; this picks the side the
    journal says is current (the new parts once all are written, else the old ones), so a reader never
    sees a row twice, whether the compaction is running or crashed.
    """
    directory = Path(output_dir)
    for _ in range(10):
        before = read_journal(directory)
        try:
            names = {n for n in os.listdir(directory) if PART_PATTERN.match(n)}
        except FileNotFoundError:
            return []
        after = read_journal(directory)
        if before == after:  # the listing is consistent with this journal (or with no journal)
            break
    else:
        raise RuntimeError(f"{directory}: compaction journal kept changing while listing parts")
    if after is not None:
        hidden = after["old"] if journal_complete(after, names) else after["new"]
        names -= set(hidden)
    return sorted((directory / n for n in names), key=_part_sort_key)

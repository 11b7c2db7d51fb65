"""The output dataset: result schema, atomic part writer, done-set scan, compaction.

An output directory is a plain Parquet dataset that pyarrow, pandas, polars and DuckDB read as is:

    part-<run_id>-<seq>.parquet      complete part files, each written once and never modified
    .tmp-<final name>.<hex>          a file being written (or left by a crashed writer); never read
    .compact-journal.json            present only while a compaction runs or after one crashed
    .compact.lock                    flock(2) taken by compaction, so recovery can tell live from crashed

Exactly once (DESIGN.md): rows enter the dataset only by the atomic rename of a complete, fsynced part
file, so a crash loses at most the rows still buffered, never half a file. Compaction replaces many parts
by few under a journal written before anything else: `list_parts` resolves it, so no reader sees a row
twice or misses one, and `prepare_output` finishes or rolls back the journal of a crashed compaction.

Live writers and compactions hold an exclusive flock on their temp files and on `.compact.lock`, so
`prepare_output` run beside them removes only what crashed processes left (where fcntl exists; elsewhere
run it only when nothing else writes to the directory).

Test-only fault injection: when the environment variable `COGBATCH_CRASH_AT` names a point, the process
SIGKILLs itself there, so crash tests can stop it where a power cut could. Points:
`part-temp-written` (part temp file fsynced, not yet renamed), `part-renamed` (part renamed into place),
`compact-journal-written` (journal in place, no new part yet), `compact-new-written` (all new parts in
place, old parts not yet deleted). Never set it outside tests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import numbers
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cogbatch.errors import ResultFileError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; prepare_output then assumes it runs alone
    fcntl = None  # type: ignore[assignment]

# The one result schema. Written explicitly into every part, never inferred from rows: an all-null
# column of a part must keep its type, or parts written by different batches would not concatenate.
# Add columns at the end when needed; never rename or retype these.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 hex of the image bytes
        pa.field("path", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("text", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
        pa.field("finish_reason", pa.string()),  # "eos" | "length" | "stop" | "repetition" | null
        pa.field("tokens_in", pa.int32()),
        pa.field("tokens_out", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("quant", pa.string()),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("attempts", pa.int32()),  # generations made for the row (> 1 after repetition retries)
    ]
)

STATUSES = frozenset({"ok", "error"})
FINISH_REASONS = frozenset({"eos", "length", "stop", "repetition"})
CRASH_ENV = "COGBATCH_CRASH_AT"

# zstd: captions compress well and every reader we target (pyarrow, polars, DuckDB, Spark) decodes it.
_COMPRESSION = "zstd"
# Compacted parts are written in row groups of this size, so compaction of many tiny parts holds this
# many rows in memory at a time instead of a whole output part.
_COMPACT_ROW_GROUP = 128 * 1024
_PART_RE = re.compile(r"^part-(?P<run>.+)-(?P<seq>\d{5,})\.parquet$")
# Temp names end in random hex, not ".parquet", so no "*.parquet" glob ever picks up a half-written file.
_TEMP_RE = re.compile(r"^\.tmp-.+\.[0-9a-f]{32}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_JOURNAL = ".compact-journal.json"
_LOCK = ".compact.lock"
_REQUIRED = frozenset(f.name for f in RESULT_SCHEMA if not f.nullable)
_INT32_RANGE = range(-(2**31), 2**31)
_DONE_COLUMNS = ["image_id", "task", "fingerprint", "created_at", "status"]


# ---------------------------------------------------------------------------------------------- rows


def make_row(**fields: Any) -> dict[str, Any]:
    """A result row with every schema column, checked now rather than when its part is written.

    A bad value caught at flush time would poison a whole buffer of good rows; caught here it points at
    the code that built the row. Missing nullable columns become None; `created_at` defaults to now (UTC).
    """
    unknown = sorted(set(fields) - set(RESULT_SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown result column(s) {unknown}; the schema has {RESULT_SCHEMA.names}")
    if fields.get("created_at") is None:
        fields["created_at"] = dt.datetime.now(dt.timezone.utc)
    missing = sorted(name for name in _REQUIRED if fields.get(name) is None)
    if missing:
        raise ValueError(f"result row needs non-null {missing}")
    row = {name: fields.get(name) for name in RESULT_SCHEMA.names}
    for field in RESULT_SCHEMA:
        _check_value(field, row[field.name])
    if row["status"] not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {row['status']!r}")
    if row["finish_reason"] is not None and row["finish_reason"] not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {sorted(FINISH_REASONS)} or None: {row['finish_reason']!r}")
    return row


def _check_value(field: pa.Field, value: Any) -> None:
    if value is None:
        return
    if pa.types.is_string(field.type):
        ok = isinstance(value, str)
    elif pa.types.is_int32(field.type):
        # numbers.Integral admits numpy integers (token counts often come from arrays); bool is not a count.
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in _INT32_RANGE
    elif pa.types.is_timestamp(field.type):
        # A naive datetime is ambiguous (local time or UTC?): refuse it rather than guess.
        ok = isinstance(value, dt.datetime) and value.utcoffset() is not None
    else:  # a column added to the schema without a check here
        raise TypeError(f"no value check for column {field.name!r} of type {field.type}")
    if not ok:
        raise ValueError(f"column {field.name!r} ({field.type}) cannot hold {value!r}")


# ------------------------------------------------------------------------------- atomic file writing


def _crash_if(point: str, armed: str | None) -> None:
    """Test-only fault injection, see the module docstring."""
    if armed == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in `directory` durable; without it a power cut can undo them."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(final: Path) -> Path:
    return final.with_name(f".tmp-{final.name}.{uuid.uuid4().hex}")


def _atomic_write(
    final: Path,
    write: Callable[[IO[bytes]], None],
    *,
    armed: str | None = None,
    crash_points: tuple[str, str] | None = None,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Write `final` so that it either does not exist or is complete: temp name, fsync, rename, fsync dir.

    The temp file is flocked while written, so `prepare_output` in another process leaves it alone.
    `crash_points` (after fsync, after rename) are the fault-injection points this write honours.
    `before_rename` is the caller's last word before the file becomes visible: raising drops it.
    """
    temp = _temp_path(final)
    with open(temp, "xb") as f:
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if crash_points:
                _crash_if(crash_points[0], armed)
            if before_rename is not None:
                before_rename()
            os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
    _fsync_dir(final.parent)
    if crash_points:
        _crash_if(crash_points[1], armed)


def _write_bytes(data: bytes) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        f.write(data)

    return write


def _write_table(table: pa.Table) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        pq.write_table(table, f, compression=_COMPRESSION)

    return write


# ---------------------------------------------------------------------------------------- the writer


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
        seqs = [int(m["seq"]) for m in map(_PART_RE.match, os.listdir(self.output_dir)) if m and m["run"] == run_id]
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
        _atomic_write(
            final,
            _write_table(table),
            armed=os.environ.get(CRASH_ENV),
            crash_points=("part-temp-written", "part-renamed"),
            before_rename=before_rename,
        )
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


# ------------------------------------------------------------------------------------------ reading


def _part_sort_key(path: Path) -> tuple[str, int]:
    m = _PART_RE.match(path.name)
    assert m is not None
    return m["run"], int(m["seq"])  # numeric seq: part 100000 comes after part 99999


def _read_journal(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / _JOURNAL).read_text())
    except FileNotFoundError:
        return None


def _journal_complete(journal: dict[str, Any], names: set[str]) -> bool:
    return all(name in names for name in journal["new"])


def list_parts(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete part files that hold the dataset now, sorted by (run id, sequence number).

    While a compaction's journal exists its old and new parts are both on disk; this picks the side the
    journal says is current (the new parts once all are written, else the old ones), so a reader never
    sees a row twice, whether the compaction is running or crashed.
    """
    directory = Path(output_dir)
    for _ in range(10):
        before = _read_journal(directory)
        try:
            names = {n for n in os.listdir(directory) if _PART_RE.match(n)}
        except FileNotFoundError:
            return []
        after = _read_journal(directory)
        if before == after:  # the listing is consistent with this journal (or with no journal)
            break
    else:
        raise RuntimeError(f"{directory}: compaction journal kept changing while listing parts")
    if after is not None:
        hidden = after["old"] if _journal_complete(after, names) else after["new"]
        names -= set(hidden)
    return sorted((directory / n for n in names), key=_part_sort_key)


def _schema_for(columns: list[str] | None) -> pa.Schema:
    if columns is None:
        return RESULT_SCHEMA
    unknown = [c for c in columns if c not in RESULT_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown result column(s) {unknown}; the schema has {RESULT_SCHEMA.names}")
    return pa.schema([RESULT_SCHEMA.field(c) for c in columns])


# What pyarrow raises for a file it cannot read or cast (ArrowInvalid is a ValueError, ArrowIOError an OSError).
_READ_ERRORS = (pa.ArrowException, OSError, ValueError)


def _read_error(path: Path, error: BaseException) -> ResultFileError:
    reason = re.sub(r"^Could not open Parquet input source '.*?': ", "", " ".join(str(error).split()))
    return ResultFileError(path, reason or type(error).__name__)  # one line: pyarrow's texts hold newlines


def _compatible(field: pa.Field, have: pa.DataType) -> bool:
    """Whether a part's column type reads as `field` (what `pq.read_table(schema=...)` casts losslessly)."""
    if pa.types.is_dictionary(have):  # pandas categoricals
        have = have.value_type
    if have == field.type or (pa.types.is_null(have) and field.nullable):
        return True
    if pa.types.is_string(field.type):
        return pa.types.is_string(have) or pa.types.is_large_string(have)
    if pa.types.is_integer(field.type):
        return pa.types.is_integer(have)
    if pa.types.is_timestamp(field.type):
        return pa.types.is_timestamp(have)
    return False


def _check_schema(path: Path, schema: pa.Schema) -> None:
    """ResultFileError unless every required column is there and every result column has a usable type.

    Nullable columns may be missing: parts written before a column was added read it as nulls.
    """
    missing = [f.name for f in RESULT_SCHEMA if not f.nullable and f.name not in schema.names]
    if missing:
        raise ResultFileError(path, f"no column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for field in RESULT_SCHEMA:
        found = schema.get_all_field_indices(field.name)
        if len(found) > 1:
            raise ResultFileError(path, f"column {field.name} appears {len(found)} times")
        if found and not _compatible(field, have := schema.field(found[0]).type):
            raise ResultFileError(path, f"column {field.name} is {have}, not {field.type}")


def _part_rows(path: Path) -> int:
    """The row count of a part file whose schema was checked; ResultFileError for a file that is no part."""
    try:
        with pq.ParquetFile(path) as f:
            schema, rows = f.schema_arrow, f.metadata.num_rows
    except FileNotFoundError:  # vanished (a live compaction): the caller lists again
        raise
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None
    _check_schema(path, schema)
    return rows


def _read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One part with RESULT_SCHEMA (or `columns` of it); ResultFileError for a file that is no part.

    Every part reads with the one schema: a nullable column added after a part was written reads as
    nulls, a compatible type (see `_compatible`) is cast. The file is opened once, footer and data.
    """
    wanted = _schema_for(columns)
    try:
        with pq.ParquetFile(path) as f:
            _check_schema(path, f.schema_arrow)
            present = [name for name in wanted.names if name in f.schema_arrow.names]
            table, rows = f.read(columns=present), f.metadata.num_rows
        arrays = [
            table[field.name].cast(field.type) if field.name in present else pa.nulls(rows, field.type)
            for field in wanted
        ]
    except FileNotFoundError:  # vanished (a live compaction): the caller lists again
        raise
    except _READ_ERRORS as e:  # not Parquet, a corrupt page, values that do not cast
        raise _read_error(path, e) from None
    for name in wanted.names:
        if name in _REQUIRED and table[name].null_count:
            raise ResultFileError(path, f"column {name} has nulls")
    return pa.Table.from_arrays(arrays, schema=wanted)


def read_results(output_dir: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """Every row of the dataset, with RESULT_SCHEMA (or just `columns`, in that order).

    Parts are read one by one rather than by dataset discovery, so a stray file in the directory (a temp
    file, a journal, someone's notes.csv) never breaks a read. A part that vanishes mid-read (a live
    compaction deleted it) restarts the read from a fresh listing. A file named like a part that is not
    one (corrupt, or of another schema) raises ResultFileError naming it: skipping it could redo or hide
    rows, reading it could add rows of nulls.
    """
    schema = _schema_for(columns)
    for _ in range(5):
        try:
            tables = [_read_part(p, columns) for p in list_parts(output_dir)]
        except FileNotFoundError:
            continue
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables)
    raise RuntimeError(f"{output_dir}: parts kept disappearing while reading (is a compaction running?)")


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per (image_id, task): the newest by created_at, ties going to the last in file order.

    A redo (changed fingerprint) or a retried error adds a row rather than rewriting a part; this is the
    view that says what the dataset currently answers for each image and task. Rows keep file order.
    """
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("created_at", "ascending")])  # stable: ties keep file order
    ranked = table.select(["image_id", "task"]).take(order)
    ranked = ranked.append_column("rank", pa.array(range(table.num_rows), pa.int64()))  # position in time order
    newest = ranked.group_by(["image_id", "task"], use_threads=False).aggregate([("rank", "max")])
    rows = pc.take(order, newest["rank_max"])  # original row numbers of the newest rows
    return table.take(pc.take(rows, pc.sort_indices(rows)))


def done_keys(output_dir: str | os.PathLike[str], *, include_errors: bool = True) -> dict[tuple[str, str], str]:
    """(image_id, task) -> fingerprint of the newest row: what a resumed run must not redo.

    Only the five columns needed are read, so the scan stays cheap on datasets of millions of captions.
    An error row counts as done by default (exactly once: a bad image fails the same way again);
    `include_errors=False` leaves out keys whose newest row is an error, for a run asked to retry them.
    """
    newest = latest_rows(read_results(output_dir, columns=_DONE_COLUMNS))
    if not include_errors:
        newest = newest.filter(pc.equal(newest["status"], "ok"))
    keys = zip(newest["image_id"].to_pylist(), newest["task"].to_pylist(), strict=True)
    return dict(zip(keys, newest["fingerprint"].to_pylist(), strict=True))


# ------------------------------------------------------------------------------ recovery, compaction


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
    _fsync_dir(directory)


def _resolve_journal(directory: Path) -> None:
    """Finish (all new parts exist) or roll back (some missing) the journal of a dead compaction.

    Each step is made durable before the next: the losing side of the parts is deleted and the directory
    fsynced before the journal goes, or a power cut could leave both sides and no journal to choose.
    """
    journal = _read_journal(directory)
    if journal is None:
        return
    names = set(os.listdir(directory))
    _unlink_all(directory, journal["old"] if _journal_complete(journal, names) else journal["new"])
    _unlink_all(directory, [_JOURNAL])


def _remove_dead_temps(directory: Path) -> None:
    """Delete temp files of crashed writers; a live writer's temp file is flocked and left alone."""
    for name in os.listdir(directory):
        if not _TEMP_RE.match(name):
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
        self._tables = (_read_part(p) for p in paths)
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


def _write_stream(stream: _RowStream, n_rows: int, counter: list[int]) -> Callable[[IO[bytes]], None]:
    def write(f: IO[bytes]) -> None:
        with pq.ParquetWriter(f, RESULT_SCHEMA, compression=_COMPRESSION) as writer:
            buffered: list[pa.Table] = []
            size = 0
            for chunk in stream.take(n_rows):
                buffered.append(chunk)
                size += chunk.num_rows
                counter[0] += chunk.num_rows
                if size >= _COMPACT_ROW_GROUP:  # one row group per write: batch tiny parts into big groups
                    writer.write_table(pa.concat_tables(buffered))
                    buffered, size = [], 0
            if buffered:
                writer.write_table(pa.concat_tables(buffered))

    return write


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
    armed = os.environ.get(CRASH_ENV)
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with _compact_lock(directory, blocking=True):
        _resolve_journal(directory)  # a crashed compaction first: its parts must not be compacted twice
        old = list_parts(directory)
        total = sum(_part_rows(p) for p in old)  # every part checked before anything is written
        n_new = math.ceil(total / target_rows)
        if n_new >= len(old):
            return len(old), len(old)
        tag = f"compact-{uuid.uuid4().hex[:12]}"
        new = [directory / f"part-{tag}-{i:05d}.parquet" for i in range(n_new)]
        journal = {"version": 1, "old": [p.name for p in old], "new": [p.name for p in new]}
        _atomic_write(directory / _JOURNAL, _write_bytes(json.dumps(journal, indent=1).encode()))
        _crash_if("compact-journal-written", armed)
        try:
            stream, written = _RowStream(old), [0]
            for i, path in enumerate(new):  # balanced: sizes differ by at most one row, none is empty
                size = total // n_new + (1 if i < total % n_new else 0)
                _atomic_write(path, _write_stream(stream, size, written))
            if written[0] != total or next(stream.take(1), None) is not None:
                raise RuntimeError(f"compaction of {directory} read {written[0]} rows, metadata said {total}")
        except BaseException:
            _unlink_all(directory, journal["new"])  # roll back: the old parts are still all there
            _unlink_all(directory, [_JOURNAL])
            raise
        _crash_if("compact-new-written", armed)
        _unlink_all(directory, journal["old"])
        _unlink_all(directory, [_JOURNAL])
    return len(old), len(new)

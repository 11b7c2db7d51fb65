"""Reading the dataset: every row with the one schema, the newest row per (image, task), the done set.

Parts are read one by one rather than by dataset discovery, so a stray file in the directory (a temp
file, a journal, someone's notes.csv) never breaks a read. A file named like a part that is not one
raises ResultFileError naming it: skipping it could redo or hide rows, reading it could add rows of nulls.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cogbatch.errors import ResultFileError
from cogbatch.store.parts import list_parts
from cogbatch.store.schema import REQUIRED, RESULT_SCHEMA

_DONE_COLUMNS = ["image_id", "task", "fingerprint", "created_at", "status"]


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


def part_rows(path: Path) -> int:
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


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
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
        if name in REQUIRED and table[name].null_count:
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
            tables = [read_part(p, columns) for p in list_parts(output_dir)]
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

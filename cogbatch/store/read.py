"""Reading the dataset: every row with the one schema, the current row per (path, task), rows to reuse.

The key of a row is (path, task): every file of a folder and every manifest row has its own row per task,
its `path` (the file's path, or a manifest row's label when it has no path). The newest row of a key is
its current one; its `image_id` says which bytes it describes, so an edited file (new bytes) has no
current row for what it holds now and is redone.

Parts are read one by one rather than by dataset discovery, so a stray file in the directory (someone's
notes.csv) never breaks a read. A file named like a part that is not one raises ResultFileError naming
it: skipping it could redo or hide rows, reading it could add rows of nulls.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cogbatch.errors import ResultFileError
from cogbatch.store.parts import list_parts
from cogbatch.store.schema import REQUIRED, RESULT_SCHEMA

# What deciding the pending work needs of every row: cheap columns only (no text), for outputs of millions.
KEY_COLUMNS = ["image_id", "path", "task", "fingerprint", "status", "created_at", "prompt"]


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


def row_keys(table: pa.Table) -> pa.Array:
    """The item each row answers for: its path; rows without one (never made by cogbatch) by their image id."""
    if "path" not in table.column_names:
        return table["image_id"].combine_chunks()
    return pc.coalesce(table["path"], table["image_id"]).combine_chunks()


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per (path, task): the newest by created_at, ties going to the last in file order.

    A redo (changed fingerprint, an edited file) or a retried error adds a row rather than rewriting a part;
    this is the view that says what the dataset currently answers for each item and task. Rows keep file
    order.
    """
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("created_at", "ascending")])  # stable: ties keep file order
    ranked = pa.table(
        {
            "key": row_keys(table).take(order),
            "task": table["task"].take(order),
            "rank": pa.array(range(table.num_rows), pa.int64()),  # position in time order
        }
    )
    newest = ranked.group_by(["key", "task"], use_threads=False).aggregate([("rank", "max")])
    rows = pc.take(order, newest["rank_max"])  # original row numbers of the newest rows
    return table.take(pc.take(rows, pc.sort_indices(rows)))


@dataclass(frozen=True)
class CurrentRow:
    """The newest row of one (path, task): which bytes it describes, with which settings, how it ended."""

    image_id: str
    fingerprint: str
    status: str


def key_table(output_dir: str | os.PathLike[str]) -> pa.Table:
    """KEY_COLUMNS of every row: what `current_rows` and `reusable_rows` work from."""
    return read_results(output_dir, columns=KEY_COLUMNS)


def current_rows(keys: pa.Table) -> dict[tuple[str, str], CurrentRow]:
    """(path, task) -> its current row, from `key_table`: what a resumed run must not redo (while the row's
    image_id is still what the path holds, and its fingerprint what the job asks for)."""
    newest = latest_rows(keys)
    cols = [row_keys(newest).to_pylist(), *(newest[c].to_pylist() for c in ("task", "image_id", "fingerprint"))]
    cols.append(newest["status"].to_pylist())
    return {(path, task): CurrentRow(i, fp, st) for path, task, i, fp, st in zip(*cols, strict=True)}


ReuseKey = tuple[str, str, str, "str | None"]  # (image_id, task, fingerprint, prompt)


def reusable_rows(
    output_dir: str | os.PathLike[str], wanted: set[ReuseKey], keys: pa.Table | None = None
) -> dict[ReuseKey, dict]:
    """(image_id, task, fingerprint, prompt) -> the newest ok row made exactly so, for each wanted key that has one.

    A file whose bytes another item of the output already has, asked the same question with the same
    settings, needs no generation: its row reuses that text. Only parts holding a wanted image are read
    whole; `keys` (`key_table`) lets the common case, no such image, read nothing more.
    """
    if keys is not None:
        ok = keys.filter(pc.equal(keys["status"], "ok"))
        present = set(ok["image_id"].to_pylist())
        wanted = {w for w in wanted if w[0] in present}
    if not wanted:
        return {}
    images = pa.array(sorted({w[0] for w in wanted}), pa.string())
    for _ in range(5):
        try:
            return _newest_ok_rows(output_dir, wanted, images)
        except FileNotFoundError:  # a live compaction replaced a part: list again
            continue
    raise RuntimeError(f"{output_dir}: parts kept disappearing while reading (is a compaction running?)")


def _newest_ok_rows(
    output_dir: str | os.PathLike[str], wanted: set[ReuseKey], images: pa.Array
) -> dict[ReuseKey, dict]:
    found: dict[ReuseKey, dict] = {}
    for part in list_parts(output_dir):
        if not pc.any(pc.is_in(read_part(part, ["image_id"])["image_id"], value_set=images)).as_py():
            continue
        table = read_part(part)
        table = table.filter(pc.and_(pc.is_in(table["image_id"], value_set=images), pc.equal(table["status"], "ok")))
        for row in table.to_pylist():
            key = (row["image_id"], row["task"], row["fingerprint"], row["prompt"])
            if key in wanted and (key not in found or row["created_at"] >= found[key]["created_at"]):
                found[key] = row
    return found


def rows_of_run(
    output_dir: str | os.PathLike[str], run_id: str, keys: set[tuple[str, str]]
) -> dict[tuple[str, str], dict]:
    """(path, task) -> the row run `run_id` wrote for it, for `keys`: the generations whose text copies share.

    Only the run's own parts are read (`part-<run_id>-...`), and compacted ones (a compaction may have run
    meanwhile), whose run_id column is looked at first.
    """
    if not keys:
        return {}
    wanted = pa.array(sorted(f"{path}\0{task}" for path, task in keys), pa.string())
    for _ in range(5):
        try:
            found: dict[tuple[str, str], dict] = {}
            for part in list_parts(output_dir):
                if part.name.startswith("part-compact-"):
                    if not pc.any(pc.equal(read_part(part, ["run_id"])["run_id"], run_id)).as_py():
                        continue
                elif not part.name.startswith(f"part-{run_id}-"):
                    continue
                table = read_part(part)
                joined = pc.binary_join_element_wise(row_keys(table), table["task"], "\0")
                mine = pc.and_(pc.equal(table["run_id"], run_id), pc.is_in(joined, value_set=wanted))
                for row in table.filter(mine).to_pylist():
                    found[(row["path"] if row["path"] is not None else row["image_id"], row["task"])] = row
            return found
        except FileNotFoundError:  # a live compaction replaced a part: list again
            continue
    raise RuntimeError(f"{output_dir}: parts kept disappearing while reading (is a compaction running?)")

"""The output dataset: schema, atomic parts, done set, compaction, and recovery after SIGKILL."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import cogbatch.store.compaction as compaction
import cogbatch.store.read as reading
from cogbatch.cli import cli
from cogbatch.errors import ResultFileError, UserError
from cogbatch.store import (
    RESULT_SCHEMA,
    PartWriter,
    compact,
    done_keys,
    latest_rows,
    list_parts,
    make_row,
    prepare_output,
    read_results,
)
from cogbatch.testing import faults

REPO = Path(__file__).resolve().parents[3]
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def image_id(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def row(i: int, *, task: str = "caption", seconds: float = 0, fingerprint: str = "fp1", **fields: object) -> dict:
    defaults = {"status": "ok", "text": f"caption {i}", "run_id": "run1"}
    created_at = T0 + dt.timedelta(seconds=seconds)
    return make_row(
        image_id=image_id(i), task=task, fingerprint=fingerprint, created_at=created_at, **defaults | fields
    )


def write_parts(directory: Path, n_rows: int, flush_rows: int, run_id: str = "run1") -> list[Path]:
    with PartWriter(directory, run_id, flush_rows=flush_rows) as writer:
        for i in range(n_rows):
            writer.add(row(i, seconds=i))
    return writer.parts_written


def row_multiset(table: pa.Table) -> Counter:
    return Counter(tuple(r.values()) for r in table.to_pylist())


def temp_files(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".tmp-")]


# ---------------------------------------------------------------------------------------------- schema


def test_schema_is_exactly_the_documented_one():
    string, int32 = pa.string(), pa.int32()
    expected = [
        ("image_id", string, False),
        ("path", string, True),
        ("task", string, False),
        ("prompt", string, True),
        ("text", string, True),
        ("status", string, False),
        ("error", string, True),
        ("finish_reason", string, True),
        ("tokens_in", int32, True),
        ("tokens_out", int32, True),
        ("width", int32, True),
        ("height", int32, True),
        ("model", string, True),
        ("quant", string, True),
        ("fingerprint", string, False),
        ("run_id", string, False),
        ("created_at", pa.timestamp("us", tz="UTC"), False),
        ("attempts", pa.int32(), True),
    ]
    assert [(f.name, f.type, f.nullable) for f in RESULT_SCHEMA] == expected


def test_written_part_carries_the_schema_even_when_optional_columns_are_all_null(tmp_path):
    with PartWriter(tmp_path, "run1") as writer:
        writer.add(make_row(image_id=image_id(0), task="caption", status="ok", fingerprint="fp", run_id="run1"))
    (part,) = writer.parts_written
    assert pq.read_schema(part).equals(RESULT_SCHEMA)  # nullability included; int32 stays int32 though all null
    assert read_results(tmp_path).schema.equals(RESULT_SCHEMA)


def test_make_row_fills_nullable_columns_and_created_at():
    r = make_row(image_id=image_id(0), task="caption", status="error", error="bad", fingerprint="fp", run_id="r")
    assert list(r) == RESULT_SCHEMA.names
    assert r["text"] is None and r["tokens_in"] is None
    assert r["created_at"].tzinfo is not None
    assert abs(r["created_at"] - dt.datetime.now(dt.timezone.utc)) < dt.timedelta(minutes=1)


@pytest.mark.parametrize(
    "override",
    [
        {"caption": "x"},  # unknown key
        {"status": None},  # required
        {"fingerprint": None},
        {"status": "maybe"},
        {"finish_reason": "tired"},
        {"tokens_out": 2**31},  # int32 overflow
        {"width": True},
        {"text": 3},
        {"created_at": dt.datetime(2025, 1, 1)},  # naive: ambiguous
    ],
)
def test_make_row_rejects_bad_rows(override):
    fields = {"image_id": image_id(0), "task": "caption", "status": "ok", "fingerprint": "fp", "run_id": "r"}
    with pytest.raises(ValueError):
        make_row(**{**fields, **override})


def test_add_validates_rows_before_buffering(tmp_path):
    writer = PartWriter(tmp_path, "run1")
    with pytest.raises(ValueError, match="unknown"):
        writer.add({**row(0), "caption": "x"})
    writer.add(row(1))
    assert writer.flush() is not None  # the bad row did not poison the buffer


# ---------------------------------------------------------------------------------------------- writer


def test_flush_by_row_count(tmp_path):
    writer = PartWriter(tmp_path, "run1", flush_rows=3)
    for i in range(7):
        writer.add(row(i))
    assert [p.name for p in writer.parts_written] == ["part-run1-00000.parquet", "part-run1-00001.parquet"]
    assert writer.rows_written == 6
    writer.close()
    assert writer.rows_written == 7 and len(writer.parts_written) == 3
    assert [pq.read_metadata(p).num_rows for p in writer.parts_written] == [3, 3, 1]
    assert writer.flush() is None  # nothing buffered: no empty part


def test_flush_by_time_with_an_injected_clock(tmp_path):
    now = [100.0]
    writer = PartWriter(tmp_path, "run1", flush_rows=1000, flush_seconds=10, clock=lambda: now[0])
    writer.add(row(0))
    now[0] = 109.9
    writer.add(row(1))
    assert writer.parts_written == []
    now[0] = 110.0
    writer.add(row(2))
    assert len(writer.parts_written) == 1 and writer.rows_written == 3
    now[0] = 115.0
    writer.add(row(3))  # 5 s since the last flush
    assert len(writer.parts_written) == 1


def test_atomic_write_leaves_only_a_readable_part(tmp_path):
    writer = PartWriter(tmp_path, "run1")
    rows = [row(i, tokens_in=10, finish_reason="eos") for i in range(5)]
    for r in rows:
        writer.add(r)
    part = writer.flush()
    assert part is not None and part.parent == tmp_path
    assert os.listdir(tmp_path) == [part.name]
    assert pq.read_table(part).to_pylist() == rows


def test_a_refusal_before_the_rename_leaves_no_file_and_keeps_the_rows(tmp_path):
    """The Ray actors' last check that their driver still holds the run: a refused part never appears."""
    writer = PartWriter(tmp_path, "run1")
    writer.add(row(0))
    seen_temp = []

    def refuse() -> None:
        seen_temp.extend(os.listdir(tmp_path))  # the part is complete and fsynced, under its temp name
        raise RuntimeError("driver gone")

    with pytest.raises(RuntimeError, match="driver gone"):
        writer.flush(before_rename=refuse)
    assert len(seen_temp) == 1 and not seen_temp[0].startswith("part-")
    assert os.listdir(tmp_path) == [] and writer.rows_written == 0
    part = writer.flush(before_rename=lambda: None)
    assert part is not None and pq.read_table(part).num_rows == 1


def test_context_manager_flushes_buffered_rows_on_exception(tmp_path):
    with pytest.raises(RuntimeError), PartWriter(tmp_path, "run1") as writer:
        writer.add(row(0))
        raise RuntimeError("model crashed")
    assert read_results(tmp_path).num_rows == 1
    with pytest.raises(ValueError, match="closed"):
        writer.add(row(1))


def test_a_second_writer_with_the_same_run_id_never_overwrites_a_part(tmp_path):
    write_parts(tmp_path, 2, flush_rows=1)
    parts = write_parts(tmp_path, 1, flush_rows=1)
    assert [p.name for p in parts] == ["part-run1-00002.parquet"]
    assert read_results(tmp_path).num_rows == 3


def test_run_id_must_be_a_safe_file_name(tmp_path):
    with pytest.raises(ValueError, match="run_id"):
        PartWriter(tmp_path, "../escape")


# ---------------------------------------------------------------------------------- prepare and read


def test_prepare_output_removes_dead_temp_files_but_not_foreign_files(tmp_path):
    out = tmp_path / "out"
    prepare_output(out)  # creates it
    write_parts(out, 2, flush_rows=1)
    dead = out / f".tmp-part-run2-00000.parquet.{'a' * 32}"
    dead.write_bytes(b"half a parquet file")
    foreign = ["notes.txt", ".tmp-someone-elses", "part-notes.txt"]
    for name in foreign:
        (out / name).write_text("mine")
    prepare_output(out)
    assert not dead.exists()
    assert all((out / name).read_text() == "mine" for name in foreign)
    assert len(list_parts(out)) == 2


@pytest.mark.skipif(compaction.fcntl is None, reason="needs flock")
def test_prepare_output_leaves_a_live_writers_temp_file(tmp_path):
    live = tmp_path / f".tmp-part-run1-00000.parquet.{'b' * 32}"
    with open(live, "wb") as f:
        compaction.fcntl.flock(f.fileno(), compaction.fcntl.LOCK_EX)
        prepare_output(tmp_path)
        assert live.exists()
    prepare_output(tmp_path)  # its writer is gone now
    assert not live.exists()


def test_read_results_ignores_non_part_files(tmp_path):
    write_parts(tmp_path, 4, flush_rows=2)
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    (tmp_path / f".tmp-part-run1-00009.parquet.{'c' * 32}").write_bytes(b"PAR1 garbage")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    table = read_results(tmp_path)
    assert table.num_rows == 4 and table.schema.equals(RESULT_SCHEMA)
    assert read_results(tmp_path, columns=["task", "image_id"]).column_names == ["task", "image_id"]
    with pytest.raises(ValueError, match="unknown"):
        read_results(tmp_path, columns=["caption"])


def test_read_results_of_an_empty_or_missing_dir_is_an_empty_table(tmp_path):
    assert read_results(tmp_path / "missing").schema.equals(RESULT_SCHEMA)
    assert read_results(tmp_path).num_rows == 0
    assert read_results(tmp_path, columns=["image_id"]).schema.names == ["image_id"]
    assert done_keys(tmp_path / "missing") == {}


def test_list_parts_sorts_sequence_numbers_numerically(tmp_path):
    names = ["part-r-99999.parquet", "part-r-100000.parquet", "part-a-00001.parquet"]
    for name in names:
        (tmp_path / name).touch()
    assert [p.name for p in list_parts(tmp_path)] == [names[2], names[0], names[1]]


def _good_table(n: int = 2) -> pa.Table:
    return pa.Table.from_pylist([row(i) for i in range(n)], schema=RESULT_SCHEMA)


def _nullable_table() -> pa.Table:
    return _good_table().cast(pa.schema([f.with_nullable(True) for f in RESULT_SCHEMA]))


def _refused_everywhere(directory: Path, bad: Path, reason: str) -> None:
    """Every reader names the bad part and why; compaction refuses and leaves the directory as it was."""
    files = sorted([*os.listdir(directory), ".compact.lock"])
    message = rf"{re.escape(str(bad))} is not a readable cogbatch result file \({reason}.*\); move it out of the"
    for read in (
        lambda: read_results(directory),
        lambda: read_results(directory, columns=["image_id", "task"]),
        lambda: done_keys(directory),
        lambda: compact(directory),
    ):
        with pytest.raises(ResultFileError, match=message) as info:
            read()
        assert "\n" not in str(info.value)  # one line on the terminal
        assert isinstance(info.value, UserError)  # exit 2 in the CLI (cogbatch.errors)
        assert info.value.path == bad
    assert sorted(os.listdir(directory)) == files  # no journal, no new part, no part deleted


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"junk\n", "Parquet file size is 5 bytes"),
        (b"", "Parquet file size is 0 bytes"),
        (b"PAR1" + b"\0" * 64 + b"PAR1", ""),  # a footer of garbage
    ],
)
def test_a_corrupt_part_is_refused_naming_the_file(tmp_path, content, reason):
    write_parts(tmp_path, 4, flush_rows=2)
    bad = tmp_path / "part-x-00001.parquet"
    bad.write_bytes(content)
    _refused_everywhere(tmp_path, bad, reason)


def test_a_truncated_part_is_refused(tmp_path):
    (good,) = write_parts(tmp_path, 3, flush_rows=3)
    bad = tmp_path / "part-x-00001.parquet"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused_everywhere(tmp_path, bad, "")


@pytest.mark.parametrize(
    "table, reason",
    [
        (pa.table({"foo": [1, 2]}), "no columns image_id, task, status, fingerprint, run_id, created_at"),
        (_good_table().drop_columns(["fingerprint"]), "no column fingerprint"),
        (_good_table().set_column(0, "image_id", pa.array([1, 2])), "column image_id is int64, not string"),
        (_good_table().set_column(8, "tokens_in", pa.array(["1", "2"])), "column tokens_in is string, not int32"),
        (_good_table().set_column(16, "created_at", pa.array(["a", "b"])), "column created_at is string, not"),
        (_good_table().append_column("task", pa.array(["x", "y"])), "column task appears 2 times"),
        # declared nullable by another writer, and holding a null: compaction could not write it
        (_nullable_table().set_column(2, "task", pa.array(["caption", None])), "column task has nulls"),
    ],
)
def test_a_part_of_another_schema_is_refused(tmp_path, table, reason):
    write_parts(tmp_path, 4, flush_rows=2)
    bad = tmp_path / "part-foreign-00001.parquet"
    pq.write_table(table, bad)
    _refused_everywhere(tmp_path, bad, reason)


def test_parts_of_compatible_schemas_are_read(tmp_path):
    """Another writer's types that cast losslessly, and nullable columns a part predates, are fine."""
    table = _good_table(3)
    other = pa.table(
        {
            "image_id": table["image_id"].dictionary_encode(),  # pandas categorical
            "task": table["task"].cast(pa.large_string()),
            "status": table["status"],
            "fingerprint": table["fingerprint"],
            "run_id": table["run_id"],
            "created_at": table["created_at"].cast(pa.timestamp("ns", tz="UTC")),
            "tokens_out": pa.array([1, 2, 3], pa.int64()),
            "width": pa.nulls(3),  # an all-null column inferred by pandas
            "extra": pa.array(["x", "y", "z"]),  # a column this version does not know
        }
    )  # no "attempts": written before it existed
    pq.write_table(other, tmp_path / "part-old-00000.parquet")
    got = read_results(tmp_path)
    assert got.schema.equals(RESULT_SCHEMA) and got.num_rows == 3
    assert got["tokens_out"].to_pylist() == [1, 2, 3] and got["attempts"].null_count == 3
    assert got["image_id"].to_pylist() == table["image_id"].to_pylist()
    assert compact(tmp_path) == (1, 1) and len(done_keys(tmp_path)) == 3


# ------------------------------------------------------------------------------------------ done set


def test_latest_rows_and_done_keys_take_the_newest_row_per_key(tmp_path):
    with PartWriter(tmp_path, "run2", flush_rows=2) as writer:
        writer.add(row(0, seconds=50, fingerprint="new"))  # written first, but newer
        writer.add(row(1, seconds=10, fingerprint="a"))
        writer.add(row(1, seconds=10, fingerprint="b"))  # tie: last in file order wins
        writer.add(row(0, seconds=5, fingerprint="old"))
        writer.add(row(0, task="vqa", seconds=1, fingerprint="v"))
        writer.add(row(2, seconds=1, fingerprint="ok"))
        writer.add(row(2, seconds=2, fingerprint="failed", status="error", error="decode error"))
    latest = latest_rows(read_results(tmp_path))
    assert latest.num_rows == 4
    assert latest["fingerprint"].to_pylist() == ["new", "b", "v", "failed"]  # file order kept
    assert done_keys(tmp_path) == {
        (image_id(0), "caption"): "new",
        (image_id(1), "caption"): "b",
        (image_id(0), "vqa"): "v",
        (image_id(2), "caption"): "failed",
    }
    assert (image_id(2), "caption") not in done_keys(tmp_path, include_errors=False)


def test_done_keys_reads_only_the_needed_columns(tmp_path, monkeypatch):
    write_parts(tmp_path, 3, flush_rows=1)
    seen = []
    real = reading.pq.ParquetFile.read

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("columns"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(reading.pq.ParquetFile, "read", spy)
    assert len(done_keys(tmp_path)) == 3
    assert seen == [["image_id", "task", "fingerprint", "created_at", "status"]] * 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["caption", "vqa"]), st.integers(0, 3)), max_size=30))
def test_latest_rows_matches_a_plain_python_reference(events):
    rows = [row(i, task=task, seconds=t, fingerprint=str(n)) for n, (i, task, t) in enumerate(events)]
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    expected: dict = {}
    for n, r in enumerate(rows):
        key = (r["image_id"], r["task"])
        if key not in expected or r["created_at"] >= expected[key][1]["created_at"]:
            expected[key] = (n, r)
    assert latest_rows(table).to_pylist() == [r for _, r in sorted(expected.values(), key=lambda e: e[0])]


# ---------------------------------------------------------------------------------------- compaction


def test_compaction_keeps_exactly_the_same_rows_in_the_same_order(tmp_path):
    write_parts(tmp_path, 20, flush_rows=3)
    before = read_results(tmp_path)
    assert compact(tmp_path, target_rows=8) == (7, 3)
    after = read_results(tmp_path)
    assert after.equals(before)
    assert row_multiset(after) == row_multiset(before)
    assert [pq.read_metadata(p).num_rows for p in list_parts(tmp_path)] == [7, 7, 6]
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in list_parts(tmp_path)] + [".compact.lock"])
    assert compact(tmp_path, target_rows=8) == (3, 3)  # nothing to gain: untouched
    assert compact(tmp_path) == (3, 1)
    assert read_results(tmp_path).equals(before)


def test_compaction_of_nothing(tmp_path):
    assert compact(tmp_path) == (0, 0)
    write_parts(tmp_path, 1, flush_rows=1)
    assert compact(tmp_path) == (1, 1)


def test_compaction_writes_large_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "_COMPACT_ROW_GROUP", 10)
    write_parts(tmp_path, 25, flush_rows=2)
    compact(tmp_path)
    (part,) = list_parts(tmp_path)
    meta = pq.read_metadata(part)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 10, 5]


def test_cli_compact_refuses_a_bad_part_and_an_unwritable_output_with_exit_2(tmp_path):
    before = write_parts(tmp_path, 4, flush_rows=2)
    bad = tmp_path / "part-x-00001.parquet"
    bad.write_bytes(b"junk\n")
    res = CliRunner().invoke(cli, ["compact", str(tmp_path)])
    assert res.exit_code == 2 and f"{bad} is not a readable cogbatch result file" in res.output
    assert isinstance(res.exception, SystemExit)  # no traceback
    bad.unlink()
    (tmp_path / ".compact.lock").unlink()
    (tmp_path / ".compact.lock").mkdir()  # cannot be opened for writing, as on a read-only file system
    res = CliRunner().invoke(cli, ["compact", str(tmp_path)])
    assert res.exit_code == 2 and f"cannot write {tmp_path / '.compact.lock'}: Is a directory" in res.output
    assert isinstance(res.exception, SystemExit)
    assert list_parts(tmp_path) == before  # nothing compacted


# ------------------------------------------------------------------------------------- crash recovery


def run_until_killed(code: str, crash_at: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env[faults.ENV] = crash_at
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr


def compact_until_killed(directory: Path, crash_at: str) -> None:
    run_until_killed(f"from cogbatch.store import compact; compact({str(directory)!r}, target_rows=8)", crash_at)


def test_crash_after_compaction_journal_rolls_back(tmp_path):
    old = write_parts(tmp_path, 20, flush_rows=3)
    before = read_results(tmp_path)
    compact_until_killed(tmp_path, "compact-journal-written")
    assert (tmp_path / ".compact-journal.json").exists()
    assert read_results(tmp_path).equals(before)  # the journal is honoured even before recovery
    prepare_output(tmp_path)
    assert list_parts(tmp_path) == old
    assert not (tmp_path / ".compact-journal.json").exists() and temp_files(tmp_path) == []
    assert row_multiset(read_results(tmp_path)) == row_multiset(before)


def test_crash_after_new_parts_completes_the_compaction(tmp_path):
    old = write_parts(tmp_path, 20, flush_rows=3)
    before = read_results(tmp_path)
    compact_until_killed(tmp_path, "compact-new-written")
    journal = json.loads((tmp_path / ".compact-journal.json").read_text())
    assert journal["old"] == [p.name for p in old] and len(journal["new"]) == 3
    assert all((tmp_path / name).exists() for name in journal["old"] + journal["new"])  # both sides on disk
    assert row_multiset(read_results(tmp_path)) == row_multiset(before)  # ...but each row seen once
    prepare_output(tmp_path)
    assert [p.name for p in list_parts(tmp_path)] == journal["new"]
    assert not any((tmp_path / name).exists() for name in journal["old"])
    assert not (tmp_path / ".compact-journal.json").exists()
    assert read_results(tmp_path).equals(before)


def test_crash_while_writing_new_parts_rolls_back(tmp_path):
    old = write_parts(tmp_path, 20, flush_rows=3)
    before = read_results(tmp_path)
    compact_until_killed(tmp_path, "compact-new-written")
    journal = json.loads((tmp_path / ".compact-journal.json").read_text())
    (tmp_path / journal["new"][-1]).unlink()  # as if killed before the last new part was renamed
    assert row_multiset(read_results(tmp_path)) == row_multiset(before)
    prepare_output(tmp_path)
    assert list_parts(tmp_path) == old
    assert read_results(tmp_path).equals(before)


def test_compact_recovers_a_crashed_compaction_before_starting(tmp_path):
    write_parts(tmp_path, 20, flush_rows=3)
    before = read_results(tmp_path)
    compact_until_killed(tmp_path, "compact-journal-written")
    assert compact(tmp_path, target_rows=8) == (7, 3)
    assert read_results(tmp_path).equals(before)


WRITE_TWO_ROWS = """
    import datetime as dt
    from cogbatch.store import PartWriter, make_row
    with PartWriter({out!r}, "crashy") as writer:
        for i in range(2):
            writer.add(make_row(image_id=str(i) * 64, task="caption", status="ok", fingerprint="fp", run_id="crashy"))
"""


def test_writer_killed_before_rename_leaves_no_visible_part(tmp_path):
    run_until_killed(WRITE_TWO_ROWS.format(out=str(tmp_path)), "part-temp-written")
    assert list_parts(tmp_path) == [] and len(temp_files(tmp_path)) == 1
    assert read_results(tmp_path).num_rows == 0  # the temp file is never read
    prepare_output(tmp_path)
    assert os.listdir(tmp_path) == [".compact.lock"]
    assert done_keys(tmp_path) == {}


def test_writer_killed_after_rename_leaves_a_complete_part(tmp_path):
    run_until_killed(WRITE_TWO_ROWS.format(out=str(tmp_path)), "part-renamed")
    prepare_output(tmp_path)
    assert [p.name for p in list_parts(tmp_path)] == ["part-crashy-00000.parquet"]
    assert temp_files(tmp_path) == []
    assert sorted(read_results(tmp_path)["image_id"].to_pylist()) == ["0" * 64, "1" * 64]

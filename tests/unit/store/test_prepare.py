"""`cogbatch.store.prepare`: an output of the old layout (state inside it) read where it is, then migrated.

The old layout is written here by hand, file by file, as the old code wrote it: parts in the output, and
beside them config.resolved.yaml, runs.jsonl, cogbatch.log, .cogbatch/{hashes.parquet, settings.json,
run.lock, cron.lock, ray/}, .compact.lock, .compact-journal.json and temp files of dead writers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cogbatch.store.prepare as preparing
from cogbatch.errors import JobLocked
from cogbatch.history import read_history
from cogbatch.inputs.hashes import HashCache
from cogbatch.lock import current_holder
from cogbatch.store import RESULT_SCHEMA, compact, is_output, list_parts, make_row, prepare_output, read_results
from cogbatch.store.settings import SettingsRegistry
from cogbatch.store.state import CONFIG, CRON_LOG, HASHES, HISTORY, SETTINGS, state_dir, state_file
from cogbatch.testing import faults

REPO = Path(__file__).resolve().parents[3]
T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
MOVED = {  # where the old layout kept each file that moves -> its name in the state directory
    "config.resolved.yaml": CONFIG,
    "runs.jsonl": HISTORY,
    "cogbatch.log": CRON_LOG,
    ".cogbatch/hashes.parquet": HASHES,
    ".cogbatch/settings.json": SETTINGS,
}


def _part(out: Path, name: str, n: int, start: int = 0) -> None:
    rows = [make_row(image_id=f"{i:064x}", path=f"/photos/{i}.jpg", task="caption", text=f"text {i}", status="ok",
                     fingerprint="fp1", run_id="old", created_at=T0 + dt.timedelta(seconds=i))
            for i in range(start, start + n)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / name, compression="zstd")


def old_layout(out: Path) -> dict[str, bytes]:
    """An output as the old code left it; returns the state files that must survive, by their old path."""
    (out / ".cogbatch" / "ray" / "20250101T000000Z-abcdef" / "attempts").mkdir(parents=True)
    _part(out, "part-20250101T000000Z-abcdef-00000.parquet", 3)
    _part(out, "part-20250101T000000Z-abcdef-00001.parquet", 2, start=3)
    (out / "config.resolved.yaml").write_text("model: tiny-random:cogvlm2\n")
    runs = [{"run_id": "20250101T000000Z-abcdef", "exit_code": 0, "done": 5}, {"run_id": "later", "exit_code": 75}]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (out / "cogbatch.log").write_text('{"done": 5}\n')
    hashes = pa.table({"path": ["/photos/0.jpg"], "size": [3], "mtime_ns": [1], "image_id": [f"{0:064x}"]})
    pq.write_table(hashes, out / ".cogbatch" / "hashes.parquet")
    (out / ".cogbatch" / "settings.json").write_text(json.dumps({"fp1": {"model": "m", "max_new_tokens": 4}}))
    for lock in (".cogbatch/run.lock", ".cogbatch/cron.lock", ".compact.lock"):
        (out / lock).touch()
    (out / ".cogbatch" / "ray" / "20250101T000000Z-abcdef" / "attempts" / "0123abcd").write_text("4242\n")
    (out / f".tmp-part-20250101T000000Z-abcdef-00002.parquet.{'a' * 32}").write_bytes(b"half a part")
    return {rel: (out / rel).read_bytes() for rel in MOVED}


def _tree(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None) for p in directory.rglob("*")}


def test_an_old_layout_is_read_where_it_is_without_moving_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old_layout(out)
    before = _tree(out)
    assert is_output(out)
    assert read_results(out).num_rows == 5 and len(list_parts(out)) == 2
    assert [r["run_id"] for r in read_history(out)] == ["20250101T000000Z-abcdef", "later"]
    assert HashCache(out).entries["/photos/0.jpg"][2] == f"{0:064x}"
    assert SettingsRegistry(out).known == {"fp1": {"model": "m", "max_new_tokens": 4}}
    assert current_holder(out) is None
    assert _tree(out) == before and not state_dir(out).exists()  # status, export, gallery: read, never move


def test_prepare_output_moves_the_state_out_and_leaves_only_the_parts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    kept = old_layout(out)
    rows = read_results(out)
    prepare_output(out)
    assert (
        sorted(os.listdir(out))
        == [p.name for p in list_parts(out)]
        == [
            "part-20250101T000000Z-abcdef-00000.parquet",
            "part-20250101T000000Z-abcdef-00001.parquet",
        ]
    )
    for old, name in MOVED.items():
        assert state_file(out, name).read_bytes() == kept[old], name  # byte for byte
    assert read_results(out).equals(rows)  # no row lost, none added, same order
    assert not state_file(out, "ray").exists()  # the old runs' crash notes: their runs are over
    assert [r["run_id"] for r in read_history(out)] == ["20250101T000000Z-abcdef", "later"]
    after = _tree(state_dir(out))
    prepare_output(out)  # nothing left to move: nothing changes
    assert _tree(state_dir(out)) == after


@pytest.mark.parametrize("moved", [CONFIG, HISTORY, HASHES])
def test_a_migration_killed_midway_is_finished_by_the_next_prepare(tmp_path, moved):
    out = tmp_path / "out"
    out.mkdir()
    kept = old_layout(out)
    rows = read_results(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env[faults.ENV] = f"state-moved@{moved}"
    code = f"from cogbatch.store import prepare_output; prepare_output({str(out)!r})"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert read_results(out).equals(rows)  # half migrated: every row still read, once
    assert read_history(out) and HashCache(out).entries  # and the state, wherever it is now
    prepare_output(out)
    assert sorted(os.listdir(out)) == [p.name for p in list_parts(out)]
    for old, name in MOVED.items():
        assert state_file(out, name).read_bytes() == kept[old], name
    assert read_results(out).equals(rows)


def test_a_crashed_compaction_of_the_old_layout_is_resolved_before_the_move(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old_layout(out)
    rows = read_results(out)
    _part(out, "part-compact-0123456789ab-00000.parquet", 5)  # all new parts written, the old ones not deleted
    journal = {"version": 1, "old": [p.name for p in list_parts(out) if "compact" not in p.name],
               "new": ["part-compact-0123456789ab-00000.parquet"]}  # fmt: skip
    (out / ".compact-journal.json").write_text(json.dumps(journal))
    assert read_results(out).num_rows == 5  # the old layout's journal is honoured where it is
    compact(out)  # compact migrates too, like run
    assert [p.name for p in list_parts(out)] == journal["new"] and os.listdir(out) == journal["new"]
    assert read_results(out).select(["image_id", "text"]).equals(rows.select(["image_id", "text"]))


def test_state_written_again_by_an_older_cogbatch_is_merged_not_lost(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old_layout(out)
    prepare_output(out)
    (out / "runs.jsonl").write_text('{"run_id": "by-an-older-version"}\n')  # a downgrade ran meanwhile
    (out / "cogbatch.log").write_text("an old crontab line still logs here\n")
    prepare_output(out)
    assert [r["run_id"] for r in read_history(out)] == ["by-an-older-version", "20250101T000000Z-abcdef", "later"]
    assert state_file(out, CRON_LOG).read_text().startswith("an old crontab line still logs here\n")
    assert sorted(os.listdir(out)) == [p.name for p in list_parts(out)]


@pytest.mark.skipif(preparing.fcntl is None, reason="needs flock")
def test_an_older_cogbatch_still_running_on_the_output_is_not_moved_under(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old_layout(out)
    (out / ".cogbatch" / "run.lock.json").write_text(json.dumps({"pid": 4242, "host": "gpu1", "command": "x"}))
    with open(out / ".cogbatch" / "run.lock", "a+b") as held:
        preparing.fcntl.flock(held.fileno(), preparing.fcntl.LOCK_EX)
        with pytest.raises(JobLocked, match="pid 4242 on host gpu1"):
            prepare_output(out)
        assert (out / "runs.jsonl").exists()  # nothing moved
    prepare_output(out)
    assert not (out / "runs.jsonl").exists()


def test_is_output_tells_an_output_from_a_folder_of_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"jpeg")
    assert not is_output(images) and not is_output(tmp_path / "missing")
    out = tmp_path / "out"
    out.mkdir()
    assert not is_output(out)  # empty
    state_dir(out).mkdir()
    assert is_output(out)  # a run that wrote no part yet
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "runs.jsonl").write_text("")
    assert is_output(tmp_path / "old")

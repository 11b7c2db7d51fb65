"""`cogbatch export` after real runs on a tiny checkpoint: .txt per ok image, jsonl / csv, edits."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cogbatch.store import latest_rows, read_results
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of


def _texts(out, task):
    table = latest_rows(read_results(out))
    table = table.filter(pc.and_(pc.equal(table["task"], task), pc.equal(table["status"], "ok")))
    return dict(zip(table["path"].to_pylist(), table["text"].to_pylist(), strict=True))


def test_export_of_a_finished_job(tmp_path, job_factory):
    images = make_images(tmp_path / "images", 4)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    job = job_factory()
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0

    res = cogbatch_cmd("export", str(job), "--format", "txt")
    assert res.returncode == 2 and "--task" in res.stderr and "Traceback" not in res.stderr

    res = cogbatch_cmd("export", str(job), "--format", "txt", "--task", "caption", "--json")
    assert res.returncode == 0, res.stderr
    report = summary_of(res)
    assert report["counts"] == {"written": 4, "unchanged": 0, "skipped": 1, "conflicts": 0}
    assert "error row" in report["skipped"][0]["reason"]
    texts = _texts(tmp_path / "out", "caption")
    assert len(texts) == 4
    for img in images:  # one .txt per ok image, with exactly the text of its Parquet row
        assert img.with_suffix(".txt").read_text(encoding="utf-8") == texts[str(img)]
    assert not (tmp_path / "images" / "broken.txt").exists()

    again = cogbatch_cmd("export", str(job), "--format", "txt", "--task", "caption")
    assert again.returncode == 0 and "0 written" in again.stderr and "4 unchanged" in again.stderr

    images[0].with_suffix(".txt").write_text("hand edited")
    kept = cogbatch_cmd("export", str(job), "--format", "txt", "--task", "colors")
    assert kept.returncode == 73 and "4 conflicts" in kept.stderr and "--overwrite" in kept.stderr  # EX_CANTCREAT
    assert "Error: 4 file(s) exist with other content and were not replaced" in kept.stderr
    assert images[0].with_suffix(".txt").read_text() == "hand edited"

    dest = tmp_path / "captions"
    mirrored = summary_of(cogbatch_cmd("export", str(job), "--format", "txt", "--task", "colors",
                                       "--dest", str(dest), "--json"))  # fmt: skip
    assert mirrored["written"] == 4
    colors = _texts(tmp_path / "out", "colors")
    assert (dest / "img_002.txt").read_text(encoding="utf-8") == colors[str(images[2])]

    rows = cogbatch_cmd("export", str(job), "--format", "jsonl")
    assert rows.returncode == 0
    records = [json.loads(line) for line in rows.stdout.splitlines()]
    assert len(records) == 10  # 5 images x 2 tasks, error rows included
    assert {r["status"] for r in records} == {"ok", "error"}
    assert "10 rows" in rows.stderr

    res = cogbatch_cmd("export", str(job), "--format", "csv", "--task", "caption", "--dest", str(dest), "--json")
    assert summary_of(res)["rows"] == 5
    parsed = list(csv.DictReader(io.StringIO((dest / "out.caption.csv").read_text(encoding="utf-8"))))
    assert {r["path"]: r["text"] for r in parsed if r["status"] == "ok"} == texts

    res = cogbatch_cmd("export", str(job), "--format", "jsonl", "--json")
    assert res.returncode == 2 and "--dest" in res.stderr


def test_a_bad_part_file_stops_every_command_with_exit_2(tmp_path, job_factory):
    make_images(tmp_path / "images", 2)
    job = job_factory()
    out = tmp_path / "out"
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    parts = sorted(p.name for p in out.glob("part-*"))
    for kind in ("corrupt", "foreign"):
        bad = out / f"part-{kind}-00001.parquet"
        if kind == "corrupt":
            bad.write_bytes(b"junk\n")
        else:  # valid Parquet of another schema: it used to export a row of nulls and crash compact
            pq.write_table(pa.table({"foo": [1, 2]}), bad)
        for args in (
            ["status", str(job)],
            ["export", str(job), "--format", "jsonl"],
            ["export", str(job), "--format", "txt", "--task", "caption"],
            ["compact", str(out)],
            ["run", str(job), "--quiet"],
        ):
            res = cogbatch_cmd(*args)
            assert res.returncode == 2, (args, res.stderr)
            assert f"{bad} is not a readable cogbatch result file (" in res.stderr, (args, res.stderr)
            assert "move it out of the output directory" in res.stderr and "Traceback" not in res.stderr
            assert res.stdout == ""
        bad.unlink()
        assert sorted(p.name for p in out.glob("part-*")) == parts and not list((tmp_path / "images").glob("*.txt"))
    assert cogbatch_cmd("compact", str(out)).returncode == 0
    assert cogbatch_cmd("export", str(job), "--format", "jsonl").stdout.count("\n") == 4


def test_export_and_compact_to_places_that_cannot_be_written_exit_2(tmp_path, job_factory):
    make_images(tmp_path / "images", 1)
    job = job_factory()
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    (tmp_path / "afile").write_text("a file, not a directory")
    dest = tmp_path / "afile" / "x"  # mkdir fails as on a read-only file system (no mount needed)
    for fmt in ("txt", "csv"):
        res = cogbatch_cmd("export", str(job), "--format", fmt, "--task", "caption", "--dest", str(dest))
        assert res.returncode == 2 and f"cannot write {dest}: Not a directory" in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    lock = tmp_path / "out.cogbatch" / "compact.lock"  # in the state directory beside the output
    lock.unlink()
    lock.mkdir()  # cannot be opened for writing
    res = cogbatch_cmd("compact", str(tmp_path / "out"))
    assert res.returncode == 2 and f"cannot write {lock}: Is a directory" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_latest_row_wins_after_an_edit_and_output_override(tmp_path, job_factory):
    images = make_images(tmp_path / "images", 3)
    job = job_factory(tasks=[{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 4}])
    other = tmp_path / "elsewhere"
    assert cogbatch_cmd("run", str(job), "--output", str(other), "--quiet").returncode == 0
    never = cogbatch_cmd("export", str(job), "--format", "txt")  # the job's own output: never run
    assert never.returncode == 2 and "has the job run?" in never.stderr and "Traceback" not in never.stderr
    assert not (tmp_path / "out").exists()  # nothing created for it
    res = cogbatch_cmd("export", str(job), "--format", "txt", "--output", str(other))
    assert res.returncode == 0 and "3 written" in res.stderr

    make_images(tmp_path / "edit", 1, seed=7)
    images[1].write_bytes((tmp_path / "edit" / "img_000.png").read_bytes())  # same path, new bytes
    assert summary_of(cogbatch_cmd("run", str(job), "--output", str(other), "--json", "--quiet"))["done"] == 1
    assert read_results(other).num_rows == 4  # the old row stays in the dataset

    res = cogbatch_cmd("export", str(job), "--format", "txt", "--output", str(other), "--overwrite")
    assert res.returncode == 0, res.stderr
    newest = _texts(other, "caption")
    for img in images:
        assert img.with_suffix(".txt").read_text(encoding="utf-8") == newest[str(img)]
    rows = cogbatch_cmd("export", str(job), "--format", "jsonl", "--output", str(other)).stdout.splitlines()
    assert len(rows) == 3  # one row per (path, task): the edited image's old row is not exported
    exported = {r["path"]: r for r in map(json.loads, rows)}
    all_rows = [r for r in read_results(other).to_pylist() if r["path"] == str(images[1])]
    assert len(all_rows) == 2
    newest_row = max(all_rows, key=lambda r: r["created_at"])
    assert exported[str(images[1])]["image_id"] == newest_row["image_id"]
    assert exported[str(images[1])]["text"] == newest_row["text"]

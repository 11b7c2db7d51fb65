"""`cogbatch run` end to end on a tiny checkpoint: rows, resume, incremental runs, settings changes."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from cogbatch.store import RESULT_SCHEMA, read_results
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of


@pytest.mark.slow
def test_forty_images_then_nothing_then_only_the_new_and_edited(tmp_path, job_factory):
    images = make_images(tmp_path / "images", 40)
    job = job_factory()

    first = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert first["exit_code"] == 0 and first["done"] == 80 and first["failed"] == 0
    table = read_results(tmp_path / "out")
    assert table.schema.equals(RESULT_SCHEMA)
    assert table.num_rows == 80
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert len(set(zip(table.column("image_id").to_pylist(), table.column("task").to_pylist(), strict=True))) == 80
    for part in (tmp_path / "out").glob("part-*.parquet"):
        assert pq.read_schema(part).equals(RESULT_SCHEMA)
    prompts = {r["path"]: r["prompt"] for r in table.to_pylist() if r["task"] == "colors"}
    assert prompts[str(images[3])] == f"What colors are in {images[3].stem}?"  # placeholder filled per image
    assert (tmp_path / "out" / "config.resolved.yaml").is_file()

    again = cogbatch_cmd("run", str(job), "--json", "--quiet")
    second = summary_of(again)
    assert second["pending"] == 0 and second["model_loaded"] is False
    assert "nothing to do" in again.stderr

    make_images(tmp_path / "images", 5, seed=1, start=40)
    images[7].write_bytes(images[8].read_bytes()[:-1] + b"\0")  # edited: new bytes, new id
    images[9].rename(images[9].with_name("renamed.png"))  # renamed: same bytes, not redone
    third = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert third["pending"] == 12
    assert third["done"] + third["failed"] == 12
    assert read_results(tmp_path / "out").num_rows == 92


@pytest.mark.slow
def test_changed_settings_are_refused_then_redone_on_request(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    job = job_factory()
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0

    changed = job_factory(tasks=[{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 6},
                                 {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa",
                                  "max_new_tokens": 3}])  # fmt: skip
    res = cogbatch_cmd("run", str(changed), "--quiet")
    assert res.returncode == 2
    assert "'caption'" in res.stderr and "max_new_tokens: 4 -> 6" in res.stderr
    assert "--redo-changed" in res.stderr and "Traceback" not in res.stderr

    redo = summary_of(cogbatch_cmd("run", str(changed), "--redo-changed", "--json", "--quiet"))
    assert redo["pending"] == 3 and redo["done"] == 3
    status = summary_of(cogbatch_cmd("status", str(changed), "--json"))
    assert status["tasks"]["caption"] == {"ok": 3, "error": 0, "stale": 0, "pending": 0}
    assert status["tasks"]["colors"]["ok"] == 3


def test_overrides_limit_and_output(tmp_path, job_factory):
    make_images(tmp_path / "images", 6)
    other = tmp_path / "elsewhere"
    make_images(other, 2, seed=9)
    job = job_factory()
    res = summary_of(cogbatch_cmd("run", str(job), "--input", str(other), "--output", str(tmp_path / "o2"),
                                  "--limit", "1", "--batch-size", "1", "--json", "--quiet"))  # fmt: skip
    assert res["pending"] == 2 and res["done"] == 2  # one image, both tasks
    assert read_results(tmp_path / "o2").num_rows == 2
    assert not (tmp_path / "out").exists()


def test_compact_keeps_every_row(tmp_path, job_factory):
    make_images(tmp_path / "images", 10)
    job = job_factory(flush_rows=3)
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    before = read_results(tmp_path / "out").sort_by([("image_id", "ascending"), ("task", "ascending")])
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) > 2
    summary = summary_of(cogbatch_cmd("compact", str(tmp_path / "out"), "--json"))
    assert summary["parts_after"] == 1
    after = read_results(tmp_path / "out").sort_by([("image_id", "ascending"), ("task", "ascending")])
    assert after.equals(before)


def test_demo_runs_without_gpu_or_download(tmp_path):
    res = cogbatch_cmd("demo", "--output", str(tmp_path / "demo"), "--images", "3", "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "random" in res.stderr
    assert summary_of(res)["done"] == 6

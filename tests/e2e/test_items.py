"""One row per input item and task: byte-identical files each get their row, from one generation per task.

a.jpg and b.jpg hold the same bytes, c.jpg others. Every file is an item with its own `path`; the run
generates twice per task and gives b.jpg (or a.jpg) the other's text; status, and the txt and JSONL
exports, cover all three paths.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cogbatch.store import read_results
from tests.e2e.conftest import cogbatch_cmd, summary_of

TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 4},
    {"name": "colors", "prompt": "What colors are in it?", "template": "vqa", "max_new_tokens": 3},
]


def _jpeg(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path, format="JPEG")


@pytest.fixture
def abc(tmp_path) -> dict[str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    _jpeg(images / "a.jpg", 1)
    (images / "b.jpg").write_bytes((images / "a.jpg").read_bytes())
    _jpeg(images / "c.jpg", 2)
    return {p.name: p for p in sorted(images.iterdir())}


def test_three_files_two_distinct_images_three_rows_per_task_two_generations(tmp_path, job_factory, abc):
    job = job_factory(tasks=TASKS)
    res = cogbatch_cmd("run", str(job))
    assert res.returncode == 0, res.stderr
    assert "3 files, 2 distinct images: 6 ok, 0 failed (2 reused)" in res.stdout  # the summary

    rows = read_results(tmp_path / "out").to_pylist()
    keys = Counter((r["path"], r["task"]) for r in rows)
    assert keys == {(str(p), t["name"]): 1 for p in abc.values() for t in TASKS}
    for task in ("caption", "colors"):
        mine = {Path(r["path"]).name: r for r in rows if r["task"] == task}
        assert sum(r["attempts"] > 0 for r in mine.values()) == 2  # generated for a (or b) and c only
        assert sorted(r["attempts"] == 0 for r in mine.values()) == [False, False, True]  # the copy's row
        a, b, c = mine["a.jpg"], mine["b.jpg"], mine["c.jpg"]
        assert (a["text"], a["image_id"], a["prompt"]) == (b["text"], b["image_id"], b["prompt"])
        assert c["image_id"] != a["image_id"]

    status = json.loads(cogbatch_cmd("status", str(job), "--json").stdout)
    assert (status["items"], status["distinct_images"]) == (3, 2)
    assert {name: t["ok"] for name, t in status["tasks"].items()} == {"caption": 3, "colors": 3}
    assert {t["pending"] for t in status["tasks"].values()} == {0}

    dest = tmp_path / "captions"
    txt = cogbatch_cmd("export", str(job), "--format", "txt", "--task", "caption", "--dest", str(dest))
    assert txt.returncode == 0, txt.stderr
    assert sorted(p.name for p in dest.rglob("*.txt")) == ["a.txt", "b.txt", "c.txt"]
    caption = {Path(r["path"]).stem: r["text"] for r in rows if r["task"] == "caption"}
    assert {p.stem: p.read_text() for p in dest.rglob("*.txt")} == caption

    jsonl = cogbatch_cmd("export", str(job), "--format", "jsonl")
    assert jsonl.returncode == 0, jsonl.stderr
    exported = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert Counter((r["path"], r["task"]) for r in exported) == Counter((r["path"], r["task"]) for r in rows)
    files = cogbatch_cmd("export", str(job), "--format", "jsonl", "--dest", str(tmp_path / "jsonl"))
    assert files.returncode == 0, files.stderr
    for task in ("caption", "colors"):  # one file per task, named after the output and the task
        lines = (tmp_path / "jsonl" / f"out.{task}.jsonl").read_text().splitlines()
        assert sorted(Path(json.loads(line)["path"]).name for line in lines) == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_copy_made_later_gets_its_rows_without_generation(tmp_path, job_factory, abc):
    job = job_factory(tasks=TASKS)
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    (abc["c.jpg"].parent / "d.jpg").write_bytes(abc["c.jpg"].read_bytes())
    summary = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert (summary["items"], summary["distinct_images"], summary["reused"], summary["done"]) == (4, 2, 2, 2)
    assert summary["model_loaded"] is False  # every text of the new file was in the output already
    rows = read_results(tmp_path / "out").to_pylist()
    new = {r["task"]: r for r in rows if r["path"] == str(abc["c.jpg"].parent / "d.jpg")}
    old = {r["task"]: r for r in rows if r["path"] == str(abc["c.jpg"])}
    assert {t: (r["text"], r["attempts"]) for t, r in new.items()} == {t: (r["text"], 0) for t, r in old.items()}
    assert len(rows) == 8

"""`cogbatch.inputs`: manifests, image ids, the hash cache and the pending computation."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogbatch.errors import ConfigError
from cogbatch.inputs.hashes import HashCache
from cogbatch.inputs.manifest import ManifestBytes
from cogbatch.inputs.pending import build_entries, changed_settings, expand_requests, limit_images, pending
from cogbatch.job import load_job


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"aaa")
    (d / "sub" / "b.PNG").write_bytes(b"bbb")
    (d / "notes.txt").write_bytes(b"not an image")
    (d / "copy_of_a.jpg").write_bytes(b"aaa")
    return d


def _job(tmp_path, **keys):
    tasks = [{"name": "t1", "prompt": "{stem} in {folder}"}, {"name": "t2", "prompt": "x"}]
    job = {"model": "test/m", "output": str(tmp_path / "out"), "tasks": tasks, **keys}
    return load_job(job, pipeline=None)


def test_folder_scan_filters_extensions_recurses_and_orders(tmp_path, folder):
    cfg = _job(tmp_path, input={"folder": str(folder)})
    entries = build_entries(cfg)
    assert [os.path.relpath(e.path, folder) for e in entries] == ["a.jpg", "copy_of_a.jpg", "sub/b.PNG"]
    assert entries[0].image_id == hashlib.sha256(b"aaa").hexdigest()
    flat = build_entries(_job(tmp_path, input={"folder": str(folder), "recursive": False}))
    assert len(flat) == 2


def test_same_bytes_at_two_paths_is_one_request_per_task(tmp_path, folder):
    cfg = _job(tmp_path, input={"folder": str(folder)})
    reqs = expand_requests(build_entries(cfg), cfg, {"t1": "f1", "t2": "f2"})
    assert len(reqs) == 4  # a.jpg (= copy_of_a.jpg) and b.PNG, two tasks each
    assert reqs[0].prompt == "a in images"
    assert reqs[2].prompt == "b in sub"


def test_hash_cache_reads_only_new_or_changed_files(tmp_path, folder, monkeypatch):
    cache = HashCache(tmp_path)
    first = cache.image_id(folder / "a.jpg")
    cache.save()
    reread = HashCache(tmp_path)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert reread.image_id(folder / "a.jpg") == first
    assert opened == []  # unchanged: size and mtime match, no read
    (folder / "a.jpg").write_bytes(b"changed!")
    assert reread.image_id(folder / "a.jpg") == hashlib.sha256(b"changed!").hexdigest()
    assert opened == [folder / "a.jpg"]


def test_manifest_paths_resolve_relative_to_the_manifest(tmp_path, folder):
    manifest = folder / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "sub/b.PNG", None, "gone.jpg"], "tags": ["x", "y", "z", "w"]}),
                   manifest)  # fmt: skip
    cfg = _job(tmp_path, input={"manifest": str(manifest)}, tasks=[{"name": "t", "prompt": "{tags}"}])
    entries = build_entries(cfg)
    assert [e.error for e in entries] == [None, None, "null path", "file not found"]
    assert entries[1].values["tags"] == "y" and entries[1].file == folder / "sub" / "b.PNG"


def test_manifest_non_string_paths_are_refused_once_not_per_row(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": [1, 2]}), manifest)
    with pytest.raises(ConfigError, match=r"input\.path_column: column 'path' holds int64, not paths"):
        _job(tmp_path, input={"manifest": str(manifest)})


def test_manifest_empty_paths_are_error_entries_that_say_so(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["", None]}), manifest)
    entries = build_entries(_job(tmp_path, input={"manifest": str(manifest)}))
    assert [e.error for e in entries] == ["empty path", "null path"]


def test_manifest_with_image_bytes(tmp_path):
    manifest = tmp_path / "m.parquet"
    table = pa.table({"id": ["one", "two", "three"], "image": [b"111", None, b"333"]})
    pq.write_table(table, manifest, row_group_size=2)
    cfg = _job(tmp_path, input={"manifest": str(manifest), "bytes_column": "image", "id_column": "id"})
    entries = build_entries(cfg)
    assert [e.path for e in entries] == ["one", "two", "three"]
    assert entries[1].error == "no image bytes"
    reader = ManifestBytes(manifest, "image")
    assert reader.get(2) == b"333" and reader.get(0) == b"111"


def test_pending_changed_and_limit(tmp_path, folder):
    cfg = _job(tmp_path, input={"folder": str(folder)})
    reqs = expand_requests(build_entries(cfg), cfg, {"t1": "new", "t2": "f2"})
    a, b = reqs[0].image.image_id, reqs[2].image.image_id
    done = {(a, "t1"): "old", (a, "t2"): "f2"}
    assert changed_settings(done, {"t1": "new", "t2": "f2"}) == {"t1": 1}
    assert [(r.image.image_id, r.task.name) for r in pending(reqs, done, False)] == [(b, "t1"), (b, "t2")]
    assert len(pending(reqs, done, True)) == 3
    assert [r.image.image_id for r in limit_images(reqs, 1)] == [a, a]


def test_builtin_placeholders_are_filled_for_rows_without_a_file(tmp_path):
    bytes_manifest = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["photos/cat.jpg", None], "image": [b"111", b"222"]}), bytes_manifest)
    tasks = [{"name": "t", "prompt": "{filename}|{stem}|{folder}"}]
    cfg = _job(tmp_path, input={"manifest": str(bytes_manifest), "bytes_column": "image", "id_column": "id"},
               tasks=tasks)  # fmt: skip
    reqs = expand_requests(build_entries(cfg), cfg, {"t": "f"})
    assert [r.prompt for r in reqs] == ["cat.jpg|cat|photos", "b.parquet#1|b|"]
    assert all(r.error is None for r in reqs)

    path_manifest = tmp_path / "p.parquet"
    pq.write_table(pa.table({"path": [None]}, schema=pa.schema([("path", pa.string())])), path_manifest)
    cfg = _job(tmp_path, input={"manifest": str(path_manifest)}, tasks=tasks)
    (req,) = expand_requests(build_entries(cfg), cfg, {"t": "f"})
    assert req.image.error == "null path" and req.prompt == "p.parquet#0|p|"


def test_a_value_its_format_spec_cannot_take_is_an_error_row_not_a_crash(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "n": [7, None]}), manifest)
    cfg = _job(tmp_path, input={"manifest": str(manifest)}, tasks=[{"name": "t", "prompt": "#{n:03d}"}])
    first, second = expand_requests(build_entries(cfg), cfg, {"t": "f"})
    assert first.prompt == "#007" and first.error is None
    assert second.prompt is None and "cannot fill the prompt '#{n:03d}'" in second.error  # null -> "" -> :03d fails


def test_a_repeated_image_with_another_question_is_asked_once_and_said_loudly(tmp_path, caplog):
    (tmp_path / "a.jpg").write_bytes(b"aaa")
    (tmp_path / "b.jpg").write_bytes(b"bbb")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "a.jpg", "b.jpg", "b.jpg"],
                             "question": ["Why?", "How?", "Who?", "Who?"]}), manifest)  # fmt: skip
    tasks = [{"name": "q", "question_column": "question"}, {"name": "c", "prompt": "{filename}"}]
    cfg = _job(tmp_path, input={"manifest": str(manifest)}, tasks=tasks)
    with caplog.at_level("WARNING", logger="cogbatch"):
        reqs = expand_requests(build_entries(cfg), cfg, {"q": "f1", "c": "f2"})
    assert [(r.task.name, r.prompt) for r in reqs] == [("q", "Why?"), ("c", "a.jpg"), ("q", "Who?"), ("c", "b.jpg")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # the same question twice loses nothing; {filename} is no per-row question
    assert "task 'q': 1 manifest row(s) repeat an image with another question" in warnings[0]
    assert "'Why?'" in warnings[0] and "its own task" in warnings[0]


def test_a_scan_stopped_by_a_signal_keeps_its_hashes_and_status_writes_nothing(tmp_path, folder):
    cfg = _job(tmp_path, input={"folder": str(folder)})
    seen = []

    def check():
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(1)

    with pytest.raises(KeyboardInterrupt):
        build_entries(cfg, check)
    assert len(HashCache(cfg.output).entries) == 2  # the work done before the signal is not lost

    other = _job(tmp_path / "elsewhere", input={"folder": str(folder)})
    assert len(build_entries(other, persist=False)) == 3
    assert not (tmp_path / "elsewhere").exists()

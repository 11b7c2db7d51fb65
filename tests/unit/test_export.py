"""`cogbatch.export` on synthetic result datasets (no model): txt beside / under DEST, jsonl, csv."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import errno
import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cogbatch.cli import cli
from cogbatch.export import DestinationError, ExportError, export_rows, export_txt, latest_by_path
from cogbatch.job import load_job
from cogbatch.store import PartWriter, make_row, read_results

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)  # export hashes bytes only: they need not decode
    return path


def row(path: Path | str, data: bytes, task: str, text: str | None, *, status="ok", minutes=0, run_id="r1"):
    return make_row(
        image_id=sha(data),
        path=str(path),
        task=task,
        prompt="p",
        text=text,
        status=status,
        error="cannot identify image" if status == "error" else None,
        fingerprint="f",
        run_id=run_id,
        created_at=T0 + dt.timedelta(minutes=minutes),
    )


def write_rows(out: Path, rows: list[dict], run_id: str = "r1") -> None:
    with PartWriter(out, run_id) as w:
        for r in rows:
            w.add(r)


@pytest.fixture
def folder_job(tmp_path, monkeypatch):
    """A folder job with two tasks and four images: two ok, one error row, one not done yet."""
    monkeypatch.chdir(tmp_path)
    imgs = tmp_path / "images"
    files = {
        "a": image(imgs / "a.png", b"aaa"),
        "b": image(imgs / "sub" / "b.jpg", b"bbb"),
        "bad": image(imgs / "bad.png", b"not an image"),
        "new": image(imgs / "new.png", b"new"),
    }
    out = tmp_path / "out"
    write_rows(
        out,
        [
            row(files["a"], b"aaa", "caption", "A red square.\nOn white, ünïcode ✓"),
            row(files["a"], b"aaa", "tags", "red, square"),
            row(files["b"], b"bbb", "caption", "  A blue circle  "),
            row(files["b"], b"bbb", "tags", "blue"),
            row(files["bad"], b"not an image", "caption", None, status="error"),
        ],
    )
    cfg = load_job(
        {
            "model": "tiny-random:cogvlm2",
            "input": {"folder": str(imgs)},
            "output": str(out),
            "tasks": [{"name": "caption", "prompt": "Describe."}, {"name": "tags", "prompt": "Tags?"}],
        }
    )
    return cfg, files


def test_txt_beside_the_images_holds_the_exact_text(folder_job):
    cfg, files = folder_job
    report = export_txt(cfg, "caption", None)
    assert report.written == 2 and report.unchanged == 0 and report.conflicts == []
    assert (files["a"].with_suffix(".txt")).read_bytes() == "A red square.\nOn white, ünïcode ✓".encode()
    assert (files["b"].with_suffix(".txt")).read_text() == "  A blue circle  "  # exactly the row's text
    assert not files["bad"].with_suffix(".txt").exists() and not files["new"].with_suffix(".txt").exists()
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert reasons["bad.png"].startswith("error row") and "no result yet" in reasons["new.png"]
    assert not list(files["a"].parent.glob(".tmp-*"))

    again = export_txt(cfg, "caption", None)
    assert again.written == 0 and again.unchanged == 2
    tags = export_txt(cfg, "tags", None, overwrite=True)
    assert tags.written == 2 and tags.overwritten == 2
    assert files["a"].with_suffix(".txt").read_text() == "red, square"


def test_txt_never_replaces_a_different_file_without_overwrite(folder_job):
    cfg, files = folder_job
    edited = files["a"].with_suffix(".txt")
    edited.write_text("my hand-corrected caption")
    report = export_txt(cfg, "caption", None)
    assert edited.read_text() == "my hand-corrected caption"
    assert [Path(c["target"]).name for c in report.conflicts] == ["a.txt"]
    assert "--overwrite" in report.conflicts[0]["reason"]
    assert report.written == 1  # b.txt
    report = export_txt(cfg, "caption", None, overwrite=True)
    assert edited.read_text().startswith("A red square.") and report.overwritten == 1 and not report.conflicts


def test_txt_needs_a_task_when_the_job_has_several(folder_job):
    cfg, _ = folder_job
    with pytest.raises(ExportError, match="several tasks"):
        export_txt(cfg, None, None)
    with pytest.raises(ExportError, match="not a task"):
        export_txt(cfg, "nope", None)


def test_txt_under_dest_mirrors_the_input_tree(folder_job, tmp_path):
    cfg, files = folder_job
    dest = tmp_path / "captions"
    report = export_txt(cfg, "caption", dest)
    assert report.written == 2
    assert (dest / "a.txt").read_text().startswith("A red square.")
    assert (dest / "sub" / "b.txt").read_text() == "  A blue circle  "
    assert not files["a"].with_suffix(".txt").exists()  # nothing beside the images


def test_latest_row_wins_after_an_image_is_edited(folder_job):
    cfg, files = folder_job
    files["a"].write_bytes(b"aaa, edited")  # same path, new bytes: a new image id
    txt = export_txt(cfg, "caption", None)
    assert not files["a"].with_suffix(".txt").exists()  # the old caption is not the new image's
    assert "no result yet" in {Path(s["path"]).name: s["reason"] for s in txt.skipped}["a.png"]

    write_rows(cfg.output, [row(files["a"], b"aaa, edited", "caption", "An edited square.", minutes=5)], "r2")
    again = export_txt(cfg, "caption", None)
    assert (again.written, again.unchanged) == (1, 1)  # a.txt now; b.txt was written the first time
    assert files["a"].with_suffix(".txt").read_text() == "An edited square."
    out = io.StringIO()
    report = export_rows(cfg, "jsonl", "caption", stdout=out)
    texts = {Path(r["path"]).name: r["text"] for r in map(json.loads, out.getvalue().splitlines())}
    assert texts["a.png"] == "An edited square." and report.rows == 3  # a, b, bad: one row per path


def test_a_caption_of_the_images_old_bytes_is_named_as_such_and_kept(folder_job):
    cfg, files = folder_job
    export_txt(cfg, "caption", None)
    files["a"].write_bytes(b"aaa, edited")
    write_rows(cfg.output, [row(files["a"], b"aaa, edited", "caption", "An edited square.", minutes=5)], "r2")
    report = export_txt(cfg, "caption", None)
    assert "older caption of this image" in report.conflicts[0]["reason"]
    assert files["a"].with_suffix(".txt").read_text().startswith("A red square.")
    assert export_txt(cfg, "caption", None, overwrite=True).overwritten == 1
    assert files["a"].with_suffix(".txt").read_text() == "An edited square."


def test_renamed_image_keeps_its_caption(folder_job):
    cfg, files = folder_job
    files["b"].rename(files["b"].with_name("renamed.jpg"))
    export_txt(cfg, "caption", None)
    assert (files["b"].parent / "renamed.txt").read_text() == "  A blue circle  "


def test_two_images_with_one_stem_conflict(folder_job):
    cfg, files = folder_job
    image(files["a"].with_suffix(".jpg"), b"aaa")  # a.jpg: same bytes as a.png, so it has a row too
    report = export_txt(cfg, "caption", None)
    assert len(report.conflicts) == 1 and "same .txt name" in report.conflicts[0]["reason"]


def test_symlinked_target_file_is_not_followed(folder_job, tmp_path):
    cfg, files = folder_job
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    files["a"].with_suffix(".txt").symlink_to(victim)
    report = export_txt(cfg, "caption", None, overwrite=True)
    assert victim.read_text() == "keep me"
    assert any("symlink" in s["reason"] for s in report.skipped)


# -- escapes under --dest ------------------------------------------------------------------------


@pytest.fixture
def manifest_job(tmp_path, monkeypatch):
    """A manifest that names images inside, above (..), and outside (absolute) its directory."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "data"
    inside = image(base / "pics" / "in.png", b"in")
    linked = image(base / "pics" / "deep" / "viaLink.png", b"link")
    above = image(tmp_path / "above.png", b"above")
    absolute = image(tmp_path / "elsewhere" / "abs.png", b"abs")
    paths = ["pics/in.png", "../above.png", str(absolute), "pics/deep/viaLink.png"]
    pq.write_table(pa.table({"path": paths}), base / "manifest.parquet")
    out = tmp_path / "out"
    write_rows(
        out,
        [
            row("pics/in.png", b"in", "caption", "inside"),
            row("../above.png", b"above", "caption", "above"),
            row(str(absolute), b"abs", "caption", "absolute"),
            row("pics/deep/viaLink.png", b"link", "caption", "through a link"),
        ],
    )
    cfg = load_job(
        {
            "model": "tiny-random:cogvlm2",
            "input": {"manifest": str(base / "manifest.parquet")},
            "output": str(out),
            "tasks": [{"name": "caption", "prompt": "Describe."}],
        }
    )
    return cfg, {"in": inside, "link": linked, "above": above, "abs": absolute}


def test_paths_that_would_escape_dest_are_skipped(manifest_job, tmp_path):
    cfg, files = manifest_job
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "pics").mkdir(parents=True)
    (dest / "pics" / "deep").symlink_to(outside, target_is_directory=True)  # a symlink inside DEST leading out
    before = {p for p in tmp_path.rglob("*.txt")}

    report = export_txt(cfg, None, dest)  # one task: --task not needed
    assert report.written == 1
    assert (dest / "pics" / "in.txt").read_text() == "inside"
    escaped = {s["path"] for s in report.skipped if "outside" in s["reason"]}
    assert escaped == {"../above.png", str(files["abs"]), "pics/deep/viaLink.png"}
    assert {p for p in tmp_path.rglob("*.txt")} - before == {dest / "pics" / "in.txt"}
    assert not list(outside.iterdir())


def test_manifest_beside_the_images_writes_where_they_are(manifest_job):
    cfg, files = manifest_job
    report = export_txt(cfg, "caption", None)
    assert report.written == 4  # without --dest the images' own folders are the destination
    assert files["above"].with_suffix(".txt").read_text() == "above"


def test_bytes_manifest_needs_dest_and_stays_inside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = pa.table({"image": [b"one", b"two", b"three"], "name": ["x/one.png", "../two.png", "/abs/three.png"]})
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "out"
    cols = table.to_pydict()
    pairs = zip(cols["image"], cols["name"], strict=True)
    write_rows(out, [row(n, d, "caption", f"text {i}") for i, (d, n) in enumerate(pairs)])
    cfg = load_job(
        {
            "model": "tiny-random:cogvlm2",
            "input": {"manifest": "m.parquet", "bytes_column": "image", "id_column": "name"},
            "output": str(out),
            "tasks": [{"name": "caption", "prompt": "Describe."}],
        }
    )
    with pytest.raises(ExportError, match="--dest"):
        export_txt(cfg, None, None)
    report = export_txt(cfg, None, tmp_path / "dest")
    assert (tmp_path / "dest" / "x" / "one.txt").read_text() == "text 0"
    assert report.written == 1 and len(report.skipped) == 2


def _bytes_job(tmp_path, name: str, table: pa.Table, texts: list[str], **input_keys):
    pq.write_table(table, tmp_path / name)
    labels = [f"{name}#{i}" for i in range(table.num_rows)]
    if "id_column" in input_keys:
        labels = [
            n if n is not None else f"{name}#{i}" for i, n in enumerate(table[input_keys["id_column"]].to_pylist())
        ]
    datas = table["image"].to_pylist()
    write_rows(tmp_path / "out", [row(lab, d, "caption", t) for lab, d, t in zip(labels, datas, texts, strict=True)])
    return load_job(
        {
            "model": "tiny-random:cogvlm2",
            "input": {"manifest": name, "bytes_column": "image", **input_keys},
            "output": str(tmp_path / "out"),
            "tasks": [{"name": "caption", "prompt": "Describe."}],
        }
    )


def test_bytes_manifest_without_id_column_names_each_row(tmp_path, monkeypatch):
    """`m.v2.parquet#N` labels would all have the stem `m`: one file would hold every caption."""
    monkeypatch.chdir(tmp_path)
    cfg = _bytes_job(tmp_path, "m.v2.parquet", pa.table({"image": [b"one", b"two", b"three"]}), ["a", "b", "c"])
    dest = tmp_path / "dest"
    report = export_txt(cfg, None, dest)
    assert report.written == 3 and report.conflicts == [] and report.skipped == []
    assert {p.name: p.read_text() for p in dest.iterdir()} == {
        "m.v2-000000.txt": "a",
        "m.v2-000001.txt": "b",
        "m.v2-000002.txt": "c",
    }


def test_bytes_manifest_row_without_a_label_gets_the_row_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = pa.table({"image": [b"one", b"two"], "name": ["x/one.png", None]})
    cfg = _bytes_job(tmp_path, "m.parquet", table, ["a", "b"], id_column="name")
    report = export_txt(cfg, None, tmp_path / "dest")
    assert report.written == 2
    assert (tmp_path / "dest" / "x" / "one.txt").read_text() == "a"
    assert (tmp_path / "dest" / "m-000001.txt").read_text() == "b"


def test_overwrite_never_replaces_an_input_image(tmp_path, monkeypatch):
    """A manifest may name an image `photo.txt`, or `a.txt` beside `a.png`: their .txt is the image."""
    monkeypatch.chdir(tmp_path)
    photo = image(tmp_path / "photo.txt", b"\x89PNG image bytes")
    a_txt = image(tmp_path / "a.txt", b"\xff\xd8 jpeg bytes")
    image(tmp_path / "a.png", b"png bytes")
    pq.write_table(pa.table({"path": ["photo.txt", "a.png", "a.txt"]}), tmp_path / "m.parquet")
    write_rows(
        tmp_path / "out",
        [
            row("photo.txt", b"\x89PNG image bytes", "caption", "a photo"),
            row("a.png", b"png bytes", "caption", "a png"),
            row("a.txt", b"\xff\xd8 jpeg bytes", "caption", "a jpeg"),
        ],
    )
    cfg = load_job(
        {
            "model": "tiny-random:cogvlm2",
            "input": {"manifest": "m.parquet"},
            "output": str(tmp_path / "out"),
            "tasks": [{"name": "caption", "prompt": "Describe."}],
        }
    )
    for overwrite in (False, True):
        report = export_txt(cfg, None, None, overwrite=overwrite)
        assert photo.read_bytes() == b"\x89PNG image bytes" and a_txt.read_bytes() == b"\xff\xd8 jpeg bytes"
        assert report.written == 0 and report.overwritten == 0
        assert {s["path"] for s in report.skipped if "image of the input" in s["reason"]} == {"photo.txt", "a.png"}


def test_the_same_image_listed_twice_or_spelled_two_ways_is_no_conflict(manifest_job, tmp_path):
    cfg, files = manifest_job
    paths = ["pics/in.png", "./pics//in.png", "pics/in.png", "pics/../pics/in.png"]
    pq.write_table(pa.table({"path": paths}), cfg.input.manifest)
    report = export_txt(cfg, None, None)
    assert (report.written, report.unchanged, report.conflicts) == (1, 3, [])
    assert files["in"].with_suffix(".txt").read_text() == "inside"
    dest = export_txt(cfg, None, tmp_path / "dest")
    assert (dest.written, dest.unchanged, dest.conflicts) == (1, 3, [])


def test_export_of_an_output_without_results_is_an_error_and_creates_nothing(folder_job, tmp_path):
    cfg, _ = folder_job
    never = tmp_path / "never"
    cfg = dataclasses.replace(cfg, output=never)
    for export in (
        lambda: export_txt(cfg, "caption", None),
        lambda: export_txt(cfg, "caption", tmp_path / "dest"),
        lambda: export_rows(cfg, "jsonl", stdout=io.StringIO()),
        lambda: export_rows(cfg, "csv", dest=tmp_path / "dest"),
    ):
        with pytest.raises(ExportError, match=r"no results in .*never; has the job run\?"):
            export()
    assert not never.exists() and not (tmp_path / "dest").exists()


def test_cli_export_of_a_missing_output_exits_2(folder_job, tmp_path):
    cfg, _ = folder_job
    job = _job_file(cfg, tmp_path, tasks=[{"name": "caption", "prompt": "Describe."}])
    for fmt in ("txt", "jsonl"):
        res = CliRunner().invoke(cli, ["export", str(job), "--format", fmt, "--output", "never"])
        assert res.exit_code == 2 and f"no results in {tmp_path / 'never'}; has the job run?" in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
    assert not (tmp_path / "never").exists()


def test_txt_and_jsonl_choose_the_same_row_after_an_image_is_reverted(folder_job):
    """Edited, captioned, then put back: the image holds its first bytes again, so their row is the one."""
    cfg, files = folder_job
    files["a"].write_bytes(b"aaa, edited")
    write_rows(cfg.output, [row(files["a"], b"aaa, edited", "caption", "An edited square.", minutes=5)], "r2")
    files["a"].write_bytes(b"aaa")  # reverted: a new mtime, the old bytes
    export_txt(cfg, "caption", None)
    assert files["a"].with_suffix(".txt").read_text().startswith("A red square.")
    for fmt in ("jsonl", "csv"):
        out = io.StringIO()
        export_rows(cfg, fmt, "caption", stdout=out)
        lines = out.getvalue().splitlines(keepends=True)
        parsed = map(json.loads, lines) if fmt == "jsonl" else csv.DictReader(io.StringIO("".join(lines)))
        a_row = {Path(r["path"]).name: r for r in parsed}["a.png"]
        assert a_row["image_id"] == sha(b"aaa") and a_row["text"].startswith("A red square.")

    files["a"].write_bytes(b"aaa, edited again")  # not run yet: txt leaves it out, jsonl keeps the newest row
    out = io.StringIO()
    export_rows(cfg, "jsonl", "caption", stdout=out)
    assert {Path(r["path"]).name: r["text"] for r in map(json.loads, out.getvalue().splitlines())}["a.png"] == (
        "An edited square."
    )


# -- jsonl / csv ---------------------------------------------------------------------------------


def test_jsonl_and_csv_hold_every_newest_row(folder_job, tmp_path):
    cfg, files = folder_job
    out = io.StringIO()
    report = export_rows(cfg, "jsonl", stdout=out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert report.rows == len(rows) == read_results(cfg.output).num_rows == 5
    assert rows[0].keys() == set(read_results(cfg.output).column_names)
    assert {(Path(r["path"]).name, r["task"]): r["text"] for r in rows}[("a.png", "caption")].startswith("A red")
    assert {r["status"] for r in rows} == {"ok", "error"}
    assert rows[0]["created_at"].endswith("Z")

    dest = tmp_path / "exports"
    report = export_rows(cfg, "csv", "caption", dest)
    target = dest / "out.csv"
    with open(target, newline="", encoding="utf-8") as f:
        parsed = list(csv.DictReader(f))
    assert report.rows == len(parsed) == 3 and report.written == 1
    assert {Path(r["path"]).name: r["text"] for r in parsed}["a.png"] == "A red square.\nOn white, ünïcode ✓"

    assert export_rows(cfg, "csv", "caption", dest).unchanged == 1
    write_rows(cfg.output, [row(files["new"], b"new", "caption", "new one", minutes=9)], "r3")
    conflict = export_rows(cfg, "csv", "caption", dest)
    assert len(conflict.conflicts) == 1
    assert len(list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))) == 3
    assert export_rows(cfg, "csv", "caption", dest, overwrite=True).overwritten == 1
    assert len(list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))) == 4
    assert not [p for p in os.listdir(dest) if p.startswith(".tmp-")]


def test_latest_by_path_keeps_the_newest_row_per_path_and_task():
    rows = [
        row("a.png", b"old", "caption", "old", minutes=1),
        row("a.png", b"new", "caption", "new", minutes=2),
        row("a.png", b"new", "tags", "t", minutes=0),
        row("b.png", b"b", "caption", "b", minutes=3),
    ]
    from cogbatch.store import RESULT_SCHEMA

    table = pa.Table.from_pylist(rows[::-1], schema=RESULT_SCHEMA)
    kept = latest_by_path(table).to_pylist()
    assert sorted((r["path"], r["task"], r["text"]) for r in kept) == [
        ("a.png", "caption", "new"),
        ("a.png", "tags", "t"),
        ("b.png", "caption", "b"),
    ]
    # a.png holds the old bytes again: their row wins over the newer one; b.png's bytes have no row
    reverted = latest_by_path(table, {"a.png": sha(b"old"), "b.png": sha(b"other")}).to_pylist()
    assert sorted((r["path"], r["task"], r["text"]) for r in reverted) == [
        ("a.png", "caption", "old"),
        ("a.png", "tags", "t"),
        ("b.png", "caption", "b"),
    ]


def _job_file(cfg, tmp_path: Path, tasks: list[dict] | None = None) -> Path:
    """`cfg` as a job file for the CLI, with its own tasks unless `tasks` are given."""
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": "tiny-random:cogvlm2",
                "input": {"folder": str(cfg.input.folder)},
                "output": str(cfg.output),
                "tasks": tasks or [{"name": t.name, "prompt": t.prompt} for t in cfg.tasks],
            }
        )
    )
    return job


def _exits_2_with(args: list[str], message: str) -> None:
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # not a crash


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_cli_export_and_status_refuse_an_output_with_a_bad_part(folder_job, tmp_path, kind):
    cfg, _ = folder_job
    bad = cfg.output / f"part-{kind}-00001.parquet"
    if kind == "corrupt":
        bad.write_bytes(b"junk\n")
        reason = "Parquet file size is 5 bytes"
    else:
        pq.write_table(pa.table({"foo": [1, 2]}), bad)  # valid Parquet: would export a row of nulls
        reason = "no columns image_id, task, status"
    message = f"{bad} is not a readable cogbatch result file ({reason}"
    job = str(_job_file(cfg, tmp_path))
    for args in (
        ["export", job, "--format", "jsonl"],
        ["export", job, "--format", "csv", "--dest", str(tmp_path / "dest")],
        ["export", job, "--format", "txt", "--task", "caption"],
        ["status", job],
    ):
        _exits_2_with(args, message)
    assert not (tmp_path / "dest" / "out.csv").exists() and not (tmp_path / "images" / "a.txt").exists()


def test_cli_export_to_an_unwritable_dest_exits_2(folder_job, tmp_path):
    cfg, _ = folder_job
    job = str(_job_file(cfg, tmp_path))
    (tmp_path / "afile").write_text("not a directory")
    dest = tmp_path / "afile" / "x"  # what a read-only file system does to mkdir, without a mount
    for fmt in ("txt", "jsonl", "csv"):
        _exits_2_with(
            ["export", job, "--format", fmt, "--task", "caption", "--dest", str(dest)],
            f"cannot write {dest}: Not a directory",
        )


def test_a_failed_csv_write_is_not_masked_by_its_cleanup(folder_job, tmp_path, monkeypatch):
    """On a read-only file system the temp file is never created, and even unlinking it fails (EROFS)."""
    cfg, _ = folder_job
    dest = tmp_path / "dest"
    dest.mkdir()

    real_open, real_unlink = open, Path.unlink

    def read_only(real):
        def refuse(path, *args, **kwargs):
            if Path(path).is_relative_to(dest):  # the output (and its hash cache) stays writable
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)

        return refuse

    monkeypatch.setattr("cogbatch.fsio.open", read_only(real_open), raising=False)
    monkeypatch.setattr(Path, "unlink", read_only(real_unlink))
    with pytest.raises(DestinationError, match=rf"cannot write {dest / 'out.csv'}: Read-only file system"):
        export_rows(cfg, "csv", dest=dest)
    report = export_txt(cfg, "caption", dest)  # txt reports each file it could not write, and goes on
    assert report.written == 0 and len(report.skipped) == 4
    assert sum("Read-only file system" in s["reason"] for s in report.skipped) == 2  # the two ok images
    monkeypatch.undo()
    assert export_txt(cfg, "caption", dest).written == 2 and sorted(os.listdir(dest)) == ["a.txt", "sub"]

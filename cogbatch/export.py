"""Exports of a job's results for tools that do not read Parquet.

Which row is exported, one rule for every format: per (path, task), the newest row for the bytes the
image at that path holds *now* (looked up through the hash cache). After an edit that is the new
bytes' row once the job has run again; after an image was reverted to bytes it had before, it is the
row of those bytes again, not the newer row of the bytes it no longer holds. A path whose current
bytes have no row (gone from the input, or edited and not run yet) falls back to its newest row.

- `txt`: one `<image stem>.txt` per image of the input now holding one task's text, beside the image
  (what LoRA trainers such as kohya's sd-scripts read) or mirrored under a destination folder. An
  image whose current bytes have no row is left out until it is redone; a renamed or copied image
  (no row under its own path) gets the newest row of its bytes. Images that are bytes inside a
  manifest are named by their `id_column` label, or `<manifest stem>-<row:06d>.txt` without one.
- `jsonl` / `csv`: every column of the chosen row per (path, task), to `DEST/<output name>.<format>`,
  or stdout.

Safety: an existing file with other content is never replaced without `overwrite` (a hand-corrected
caption survives a re-export; an identical one is reported as unchanged), and an input image is
never replaced at all (a manifest may name an image `photo.txt`). Under a destination, every file
must land inside it whatever the manifest says: absolute paths, `..` and symlinked directories that
lead out are reported and skipped. Files are written to a temp name and renamed, so a reader never
sees half a caption. An output without results is an error, and nothing is created for it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import filecmp
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from cogbatch.errors import DestinationError, ExportError
from cogbatch.fsio import atomic_file
from cogbatch.inputs.entries import ImageEntry
from cogbatch.inputs.pending import build_entries
from cogbatch.job.config import JobConfig
from cogbatch.results import ExportReport
from cogbatch.store import RESULT_SCHEMA, latest_rows, list_parts, read_results

FORMATS = ("txt", "jsonl", "csv")
_TXT_COLUMNS = ["image_id", "path", "task", "text", "status", "error", "created_at"]


# -- choosing rows -------------------------------------------------------------------------------


def latest_by_path(table: pa.Table, current: dict[str, str] | None = None) -> pa.Table:
    """One row per (path, task), file order kept: the newest by created_at (ties: the last in file order)
    among the rows for the bytes the path holds now (`current`: path -> image_id), else among all of
    the path's rows.

    An edited image keeps its path but gets a new image_id, so `latest_rows` would keep both its old
    and its new row; per path, only what the image holds now counts. Newest alone would be wrong after
    a revert: the image holds its old bytes again and the newer row describes bytes it no longer has.
    Rows without a path (never made by cogbatch, but possible) are keyed by image_id.
    """
    if table.num_rows == 0:
        return table
    key = pc.coalesce(table["path"], table["image_id"])
    if current:
        pairs = pa.array([f"{path}\0{image_id}" for path, image_id in current.items()], pa.string())
        joined = pc.binary_join_element_wise(table["path"], table["image_id"], "\0")
        is_current = pc.fill_null(pc.is_in(joined, value_set=pairs), False).cast(pa.int8())
    else:
        is_current = pa.array([0] * table.num_rows, pa.int8())
    ranking = pa.table({"current": is_current, "created_at": table["created_at"]})
    # stable: ties keep file order; rows for the current bytes rank above all others of their path
    order = pc.sort_indices(ranking, sort_keys=[("current", "ascending"), ("created_at", "ascending")])
    ranked = pa.table(
        {"key": key.take(order), "task": table["task"].take(order), "rank": pa.array(range(table.num_rows))}
    )
    newest = ranked.group_by(["key", "task"], use_threads=False).aggregate([("rank", "max")])
    rows = pc.take(order, newest["rank_max"])
    return table.take(pc.take(rows, pc.sort_indices(rows)))


def current_images(entries: list[ImageEntry]) -> dict[str, str]:
    """path -> image_id of the input now: what `latest_by_path` prefers (the first entry of a path wins)."""
    current: dict[str, str] = {}
    for entry in entries:
        current.setdefault(entry.path, entry.image_id)
    return current


def require_results(cfg: JobConfig) -> None:
    """ExportError when the output holds no result parts: exporting nothing with exit 0 (and creating the
    directory for a hash cache) hides a mistyped --output or a job that never ran."""
    if not list_parts(cfg.output):
        raise ExportError(f"no results in {cfg.output}; has the job run?")


def _check_task(cfg: JobConfig, task: str | None) -> None:
    names = [t.name for t in cfg.tasks]
    if task is not None and task not in names:
        raise ExportError(f"--task {task!r} is not a task of this job (tasks: {', '.join(names)})")


# -- files ---------------------------------------------------------------------------------------


def _make_dest(dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DestinationError(f"cannot write {dest}: {e.strerror or e}") from None


def _inside(root_real: Path, target: Path) -> bool:
    """Whether `target` (which may not exist yet) resolves inside `root_real`, following symlinks.

    The deepest existing ancestor is resolved (a symlinked directory anywhere on the way is followed);
    the components below it do not exist yet, so nothing can redirect them before they are created.
    """
    probe = target
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    real = probe.resolve()
    if probe != target:
        real = real / target.relative_to(probe)
    return real == root_real or root_real in real.parents


def _mirror(rel: str) -> Path | None:
    """A manifest or folder path as a relative path under DEST, or None when it would leave DEST."""
    if not rel or os.path.isabs(rel) or rel.startswith("~"):
        return None
    norm = os.path.normpath(rel)
    if norm == "." or norm == ".." or norm.startswith(".." + os.sep) or os.path.isabs(norm):
        return None
    return Path(norm)


# -- txt -----------------------------------------------------------------------------------------


def export_txt(cfg: JobConfig, task: str | None, dest: Path | None, overwrite: bool = False) -> ExportReport:
    """Write one `<stem>.txt` per image with `task`'s text (the row chosen by `latest_by_path`); see the
    module docstring."""
    task = _txt_task(cfg, task)
    bytes_input = cfg.input.bytes_column is not None
    if bytes_input and dest is None:
        raise ExportError("the images of this job are bytes inside a manifest: give --dest DIR for the .txt files")
    require_results(cfg)
    report = ExportReport("txt", str(cfg.output), str(dest) if dest is not None else None, task)
    dest_real = None
    if dest is not None:
        _make_dest(dest)
        dest_real = dest.resolve()

    entries = build_entries(cfg)
    rows = read_results(cfg.output, _TXT_COLUMNS).filter(pc.equal(pc.field("task"), task))
    chosen = {r["path"]: r for r in latest_by_path(rows, current_images(entries)).to_pylist() if r["path"]}
    by_bytes = {r["image_id"]: r for r in latest_rows(rows).to_pylist()}
    earlier: dict[str, set[str]] = {}  # path -> texts of its older rows, to name a stale caption as such
    for path, text in zip(rows["path"].to_pylist(), rows["text"].to_pylist(), strict=True):
        if path is not None and text is not None:
            earlier.setdefault(path, set()).add(text)
    images = _input_files(entries)
    claimed: dict[str, _Claim] = {}  # real target path -> who writes it
    for entry in entries:
        label = entry.path
        row = chosen.get(label)
        if row is None or row["image_id"] != entry.image_id:  # renamed or copied: no row under this path
            row = by_bytes.get(entry.image_id)
        reason = _skip_reason(entry, row, bytes_input)
        if reason is not None:
            report.skipped.append({"path": label, "reason": reason})
            continue
        target = _txt_target(cfg, entry, dest)
        if target is None or (dest_real is not None and not _inside(dest_real, target)):
            report.skipped.append({"path": label, "reason": f"its .txt would be outside {dest}"})
            continue
        claim = _Claim(label, _identity(entry), (row["text"] or "").encode("utf-8"))
        prior = claimed.setdefault(os.path.realpath(target), claim)
        if prior is not claim:
            if (prior.identity, prior.content) == (claim.identity, claim.content):
                report.unchanged += 1  # the same image listed twice, or spelled two ways (./pics//a.png)
            else:
                reason = f"{prior.label} has the same .txt name"
                report.conflicts.append({"path": label, "target": str(target), "reason": reason})
            continue
        _write_one(target, claim.content, label, overwrite, report, earlier.get(label, set()), images)
    return report


@dataclass(frozen=True)
class _Claim:
    label: str
    identity: tuple[Any, ...]  # which image: a file (device, inode) or inline bytes (image id)
    content: bytes


def _txt_task(cfg: JobConfig, task: str | None) -> str:
    if task is None:
        if len(cfg.tasks) > 1:
            names = ", ".join(t.name for t in cfg.tasks)
            raise ExportError(f"this job has several tasks ({names}): choose one with --task")
        return cfg.tasks[0].name
    _check_task(cfg, task)
    return task


def _skip_reason(entry: ImageEntry, row: dict[str, Any] | None, bytes_input: bool) -> str | None:
    if row is None:
        return "no result yet (run the job)"
    if row["status"] != "ok":
        return f"error row: {row['error'] or 'no reason'}"
    if bytes_input and entry.row is None:
        return "no image bytes"
    if not bytes_input and entry.file is None:
        return "no image file"
    return None


def _txt_target(cfg: JobConfig, entry: ImageEntry, dest: Path | None) -> Path | None:
    """Where the image's .txt goes, or None when a mirrored path would leave DEST (checked again, on the
    real file system, by `_inside`)."""
    if dest is None:
        return entry.file.with_name(entry.file.stem + ".txt")
    if cfg.input.bytes_column is not None:
        label = entry.values.get(cfg.input.id_column) if cfg.input.id_column else None
        if label is None or str(label) == "":  # `m.parquet#N` would give every row the stem "m"
            return dest / f"{cfg.input.manifest.stem}-{entry.row:06d}.txt"
        rel = _mirror(str(label))
    else:
        base = cfg.input.folder if cfg.input.folder is not None else cfg.input.manifest.parent
        rel = _mirror(os.path.relpath(os.path.abspath(entry.file), base))
    return dest / rel.with_name(rel.stem + ".txt") if rel is not None else None


def _identity(entry: ImageEntry) -> tuple[Any, ...]:
    if entry.file is None:
        return ("bytes", entry.image_id)
    try:
        st = entry.file.stat()
    except OSError:
        return ("path", os.path.realpath(entry.file))
    return ("file", st.st_dev, st.st_ino)


def _input_files(entries: list[ImageEntry]) -> set[tuple[int, int]]:
    """(device, inode) of every readable input image: files a .txt must never replace."""
    found = set()
    for entry in entries:
        if entry.file is not None and entry.error is None:
            with contextlib.suppress(OSError):
                st = entry.file.stat()
                found.add((st.st_dev, st.st_ino))
    return found


def _write_one(
    target: Path,
    content: bytes,
    label: str,
    overwrite: bool,
    report: ExportReport,
    earlier: set[str],
    images: set[tuple[int, int]],
) -> None:
    try:
        if target.is_symlink():
            report.skipped.append({"path": label, "reason": f"{target} is a symlink (not followed)"})
            return
        existed = target.exists()
        if existed:
            st = target.stat()
            if (st.st_dev, st.st_ino) in images:
                reason = f"{target} is an image of the input (never replaced by a caption)"
                report.skipped.append({"path": label, "reason": reason})
                return
            if not target.is_file():
                report.conflicts.append({"path": label, "target": str(target), "reason": "not a regular file"})
                return
            existing = target.read_bytes()
            if existing == content:
                report.unchanged += 1
                return
            if not overwrite:
                stale = existing.decode("utf-8", "replace") in earlier
                what = "an older caption of this image" if stale else "other text"
                reason = f"exists with {what} (--overwrite replaces it)"
                report.conflicts.append({"path": label, "target": str(target), "reason": reason})
                return
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as f:
            f.write(content)
    except OSError as e:
        report.skipped.append({"path": label, "reason": f"cannot write {target}: {e.strerror or e}"})
        return
    report.written += 1
    report.overwritten += int(existed)


# -- jsonl / csv ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def _write_rows(table: pa.Table, fmt: str, out: IO[str]) -> int:
    """Stream `table` as JSON Lines or CSV (header first); returns the row count."""
    writer = csv.DictWriter(out, fieldnames=table.column_names, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    n = 0
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            row = {k: _plain(v) for k, v in row.items()}
            if writer is not None:
                writer.writerow(row)
            else:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def export_rows(
    cfg: JobConfig,
    fmt: str,
    task: str | None = None,
    dest: Path | None = None,
    overwrite: bool = False,
    stdout: IO[str] | None = None,
) -> ExportReport:
    """The row per (path, task) that `latest_by_path` chooses, every column, as JSONL or CSV to
    DEST/<output name>.<fmt> or stdout."""
    if fmt not in ("jsonl", "csv"):
        raise ExportError(f"unknown row format {fmt!r}")
    _check_task(cfg, task)
    require_results(cfg)
    table = read_results(cfg.output)
    if task is not None:
        table = table.filter(pc.equal(pc.field("task"), task))
    table = latest_by_path(table, current_images(build_entries(cfg)))
    if table.num_rows:
        table = table.take(pc.sort_indices(table, sort_keys=[("path", "ascending"), ("task", "ascending")]))
    table = table.select(RESULT_SCHEMA.names)
    report = ExportReport(fmt, str(cfg.output), str(dest) if dest is not None else None, task)
    if dest is None:
        report.rows = _write_rows(table, fmt, stdout or sys.stdout)
        return report
    _make_dest(dest)
    target = dest / f"{cfg.output.name}.{fmt}"
    label = str(target)

    def commit(temp: Path) -> bool:
        """Replace `target` only when that is safe and changes something; the report says what happened."""
        if target.is_symlink():
            report.skipped.append({"path": label, "reason": "is a symlink (not followed)"})
        elif target.exists() and filecmp.cmp(temp, target, shallow=False):
            report.unchanged += 1
        elif target.exists() and not overwrite:
            reason = "exists with other content (--overwrite replaces it)"
            report.conflicts.append({"path": label, "target": label, "reason": reason})
        else:
            report.overwritten += int(target.exists())
            report.written += 1
            return True
        return False

    try:
        with atomic_file(target, "w", commit=commit, encoding="utf-8", newline="") as f:
            report.rows = _write_rows(table, fmt, f)
    except OSError as e:  # read-only file system, disk full, a directory named like the target…
        raise DestinationError(f"cannot write {target}: {e.strerror or e}") from None
    return report

"""Exports of a job's results for tools that do not read Parquet.

- `txt`: one `<image stem>.txt` per image holding one task's text, beside the image (what LoRA
  trainers such as kohya's sd-scripts read) or mirrored under a destination folder. Done per image
  of the job's input *now*: each image's bytes are looked up (through the hash cache) and its newest
  row is written, so an edited image gets the caption of its new bytes, a renamed one keeps its
  caption under the new name, and an image edited since its last run is left out until it is redone.
- `jsonl` / `csv`: the rows of the dataset, the newest per (path, task): after an image was edited
  and captioned again, its old row is not exported. To `DEST/<output name>.<format>`, or stdout.

Safety: an existing file with other content is never replaced without `overwrite` (a hand-corrected
caption survives a re-export; an identical one is reported as unchanged). Under a destination,
every file must land inside it whatever the manifest says: absolute paths, `..` and symlinked
directories that lead out are reported and skipped. Files are written to a temp name and renamed,
so a reader never sees half a caption.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import filecmp
import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from cogbatch.config import JobConfig
from cogbatch.manifest import build_entries
from cogbatch.store import RESULT_SCHEMA, latest_rows, read_results

FORMATS = ("txt", "jsonl", "csv")
_TXT_COLUMNS = ["image_id", "path", "task", "text", "status", "error", "created_at"]


class ExportError(Exception):
    """A request that cannot be exported as asked (the CLI turns it into a usage error)."""


@dataclass
class ExportReport:
    format: str
    output: str
    dest: str | None
    task: str | None = None
    rows: int = 0  # rows exported (jsonl / csv)
    written: int = 0
    overwritten: int = 0  # of `written`: files that existed with other content (--overwrite)
    unchanged: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    conflicts: list[dict[str, str]] = field(default_factory=list)  # {"path", "target", "reason"}

    def describe(self, limit: int = 20) -> str:
        """The human summary: counts, then the first `limit` conflicts and skips with their reasons."""
        where = self.dest or ("beside the images" if self.format == "txt" else "stdout")
        what = f"task {self.task!r}" if self.task else "all tasks"
        if self.format != "txt" and self.dest is None:
            return f"{self.format} export of {what}: {self.rows} rows -> stdout"
        rows = f"{self.rows} rows; " if self.format != "txt" else ""
        lines = [
            f"{self.format} export of {what} -> {where}: {rows}{self.written} written "
            f"({self.overwritten} overwritten), {self.unchanged} unchanged, {len(self.skipped)} skipped, "
            f"{len(self.conflicts)} conflicts"
        ]
        problems = [("conflict", c) for c in self.conflicts] + [("skipped", c) for c in self.skipped]
        lines += [f"  {kind}: {p['path']}: {p['reason']}" for kind, p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"  ... and {len(problems) - limit} more (--json lists them all)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "counts": {
                "written": self.written,
                "unchanged": self.unchanged,
                "skipped": len(self.skipped),
                "conflicts": len(self.conflicts),
            },
        }


# -- choosing rows -------------------------------------------------------------------------------


def latest_by_path(table: pa.Table) -> pa.Table:
    """One row per (path, task): the newest by created_at (ties: the last in file order), file order kept.

    An edited image keeps its path but gets a new image_id, so `latest_rows` would keep both its old
    and its new row; per path, only what the image holds now counts. Rows without a path (never made by
    cogbatch, but possible) are keyed by image_id.
    """
    if table.num_rows == 0:
        return table
    key = pc.coalesce(table["path"], table["image_id"])
    order = pc.sort_indices(table, sort_keys=[("created_at", "ascending")])  # stable: ties keep file order
    ranked = pa.table(
        {"key": key.take(order), "task": table["task"].take(order), "rank": pa.array(range(table.num_rows))}
    )
    newest = ranked.group_by(["key", "task"], use_threads=False).aggregate([("rank", "max")])
    rows = pc.take(order, newest["rank_max"])
    return table.take(pc.take(rows, pc.sort_indices(rows)))


def _check_task(cfg: JobConfig, task: str | None) -> None:
    names = [t.name for t in cfg.tasks]
    if task is not None and task not in names:
        raise ExportError(f"--task {task!r} is not a task of this job (tasks: {', '.join(names)})")


# -- files ---------------------------------------------------------------------------------------


def _temp_for(target: Path) -> Path:
    return target.with_name(f".tmp-{target.name}.{uuid.uuid4().hex}")


@contextlib.contextmanager
def _atomic_file(target: Path, mode: str = "wb", **kw: Any) -> Iterator[IO[Any]]:
    """Write `target` through a temp file renamed into place when the block succeeds."""
    temp = _temp_for(target)
    try:
        with open(temp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


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
    """Write one `<stem>.txt` per image with `task`'s newest text; see the module docstring."""
    if task is None:
        if len(cfg.tasks) > 1:
            names = ", ".join(t.name for t in cfg.tasks)
            raise ExportError(f"this job has several tasks ({names}): choose one with --task")
        task = cfg.tasks[0].name
    _check_task(cfg, task)
    bytes_input = cfg.input.bytes_column is not None
    if bytes_input and dest is None:
        raise ExportError("the images of this job are bytes inside a manifest: give --dest DIR for the .txt files")
    report = ExportReport("txt", str(cfg.output), str(dest) if dest is not None else None, task)
    base = cfg.input.folder if cfg.input.folder is not None else cfg.input.manifest.parent
    dest_real = None
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
        dest_real = dest.resolve()

    rows = read_results(cfg.output, _TXT_COLUMNS).filter(pc.equal(pc.field("task"), task))
    newest = {r["image_id"]: r for r in latest_rows(rows).to_pylist()}
    earlier: dict[str, set[str]] = {}  # path -> texts of its older rows, to name a stale caption as such
    for path, text in zip(rows["path"].to_pylist(), rows["text"].to_pylist(), strict=True):
        if path is not None and text is not None:
            earlier.setdefault(path, set()).add(text)
    claimed: dict[Path, str] = {}
    for entry in build_entries(cfg):
        label = entry.path
        row = newest.get(entry.image_id)
        if row is None:
            report.skipped.append({"path": label, "reason": "no result yet (run the job)"})
            continue
        if row["status"] != "ok":
            report.skipped.append({"path": label, "reason": f"error row: {row['error'] or 'no reason'}"})
            continue
        if entry.file is None and not bytes_input:
            report.skipped.append({"path": label, "reason": "no image file"})
            continue
        if dest is None:
            target = entry.file.with_name(entry.file.stem + ".txt")
        else:
            rel = _mirror(label if bytes_input else os.path.relpath(os.path.abspath(entry.file), base))
            target = dest / rel.with_name(rel.stem + ".txt") if rel is not None else None
            if target is None or not _inside(dest_real, target):
                report.skipped.append({"path": label, "reason": f"its .txt would be outside {dest}"})
                continue
        if target in claimed:
            report.conflicts.append(
                {"path": label, "target": str(target), "reason": f"{claimed[target]} has the same .txt name"}
            )
            continue
        claimed[target] = label
        _write_one(target, (row["text"] or "").encode("utf-8"), label, overwrite, report, earlier.get(label, set()))
    return report


def _write_one(
    target: Path, content: bytes, label: str, overwrite: bool, report: ExportReport, earlier: set[str]
) -> None:
    try:
        if target.is_symlink():
            report.skipped.append({"path": label, "reason": f"{target} is a symlink (not followed)"})
            return
        existed = target.exists()
        if existed:
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
        with _atomic_file(target) as f:
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
    """The newest row per (path, task), every column, as JSONL or CSV to DEST/<output name>.<fmt> or stdout."""
    if fmt not in ("jsonl", "csv"):
        raise ExportError(f"unknown row format {fmt!r}")
    _check_task(cfg, task)
    table = read_results(cfg.output)
    if task is not None:
        table = table.filter(pc.equal(pc.field("task"), task))
    table = latest_by_path(table)
    if table.num_rows:
        table = table.take(pc.sort_indices(table, sort_keys=[("path", "ascending"), ("task", "ascending")]))
    table = table.select(RESULT_SCHEMA.names)
    report = ExportReport(fmt, str(cfg.output), str(dest) if dest is not None else None, task)
    if dest is None:
        report.rows = _write_rows(table, fmt, stdout or sys.stdout)
        return report
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{cfg.output.name}.{fmt}"
    label = str(target)
    temp = _temp_for(target)
    try:
        with open(temp, "w", encoding="utf-8", newline="") as f:
            report.rows = _write_rows(table, fmt, f)
        if target.is_symlink():
            report.skipped.append({"path": label, "reason": "is a symlink (not followed)"})
        elif target.exists() and filecmp.cmp(temp, target, shallow=False):
            report.unchanged += 1
        elif target.exists() and not overwrite:
            reason = "exists with other content (--overwrite replaces it)"
            report.conflicts.append({"path": label, "target": label, "reason": reason})
        else:
            report.overwritten += int(target.exists())
            os.replace(temp, target)
            report.written += 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return report

"""What there is to do: the images of a folder or a Parquet manifest, and which (image, task) pairs are pending.

Images are identified by the sha256 of their bytes, so a renamed file is not redone and an edited
one is. Hashing 50,000 photos every night would cost more than the new work, so hashes are cached
per (path, size, mtime) in the output directory; only new or changed files are read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.config import BUILTIN_PLACEHOLDERS, InputConfig, JobConfig, TaskConfig

log = logging.getLogger("cogbatch")

HASH_CACHE = Path(".cogbatch") / "hashes.parquet"
_HASH_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("image_id", pa.string())]
)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unreadable_id(label: str) -> str:
    """A stable id for an input that has no bytes to hash (missing file, null path)."""
    return sha256_hex(b"unreadable\0" + label.encode("utf-8", "surrogateescape"))


@dataclass
class ImageEntry:
    image_id: str
    path: str  # what the result row shows: the file path, or a manifest row label
    file: Path | None = None  # where to read the bytes from, or None
    row: int | None = None  # manifest row holding inline bytes
    values: dict[str, Any] = field(default_factory=dict)  # placeholder values: filename, stem, folder, columns
    error: str | None = None  # known unreadable before decoding


@dataclass
class Request:
    image: ImageEntry
    task: TaskConfig
    prompt: str | None  # the filled prompt; None when the question is missing (then `error` says why)
    fingerprint: str
    error: str | None = None


class HashCache:
    """(path, size, mtime_ns) -> sha256, persisted atomically beside the results."""

    def __init__(self, output_dir: Path) -> None:
        self.file = output_dir / HASH_CACHE
        self.entries: dict[str, tuple[int, int, str]] = {}
        self.dirty = False
        self.lock = threading.Lock()
        try:
            t = pq.read_table(self.file, schema=_HASH_SCHEMA).to_pydict()
            for p, s, m, i in zip(t["path"], t["size"], t["mtime_ns"], t["image_id"], strict=True):
                self.entries[p] = (s, m, i)
        except Exception:  # missing or damaged: it is only a cache, start empty
            self.entries = {}

    def image_id(self, path: Path) -> str:
        """The file's sha256, read from disk only when the file is new or changed. Raises OSError."""
        st = path.stat()
        key = str(path)
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self.lock:
            self.entries[key] = (st.st_size, st.st_mtime_ns, digest)
            self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        paths = sorted(self.entries)
        table = pa.table(
            {
                "path": paths,
                "size": [self.entries[p][0] for p in paths],
                "mtime_ns": [self.entries[p][1] for p in paths],
                "image_id": [self.entries[p][2] for p in paths],
            },
            schema=_HASH_SCHEMA,
        )
        tmp = self.file.with_name(f".tmp-{os.getpid()}-{self.file.name}")
        pq.write_table(table, tmp)
        os.replace(tmp, self.file)
        self.dirty = False


def scan_folder(inp: InputConfig) -> list[Path]:
    """Image files under the folder, sorted so that the order of work is deterministic."""
    exts = {"." + e for e in inp.extensions}
    found: list[Path] = []
    if inp.recursive:
        for root, dirs, files in os.walk(inp.folder):
            dirs.sort()
            found += [Path(root) / f for f in files if Path(f).suffix.lower() in exts]
    else:
        found = [p for p in inp.folder.iterdir() if p.suffix.lower() in exts and not p.is_dir()]
    return sorted(found)


def builtin_values(label: str | PurePath) -> dict[str, str]:
    """`{filename}`, `{stem}`, `{folder}` of an image's path or label, so every request can fill them.

    Inline-bytes rows and rows without a path have only a label (`id_column` value, `manifest.parquet#7`):
    its parts stand in for the file's, so a prompt using them never fails on such rows.
    """
    path = PurePath(label)
    return {"filename": path.name, "stem": path.stem or path.name, "folder": path.parent.name}


def _file_entry(path: Path, display: str, cache: HashCache, values: dict[str, Any]) -> ImageEntry:
    values = {**builtin_values(path), **values}
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory")
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise OSError(0, "not a regular file")
        return ImageEntry(cache.image_id(path), display, file=path, values=values)
    except OSError as e:
        reason = {2: "file not found", 13: "permission denied", 21: "is a directory", 40: "symlink loop"}.get(
            e.errno, e.strerror or type(e).__name__
        )
        return ImageEntry(unreadable_id(display), display, file=path, values=values, error=reason)


def _never_stop() -> None:
    return None


def folder_entries(inp: InputConfig, cache: HashCache, check: Callable[[], None] = _never_stop) -> list[ImageEntry]:
    entries = []
    for p in scan_folder(inp):
        check()
        entries.append(_file_entry(p, str(p), cache, {}))
    return entries


def manifest_entries(inp: InputConfig, cache: HashCache, check: Callable[[], None] = _never_stop) -> list[ImageEntry]:
    """One entry per manifest row; paths resolve relative to the manifest's directory."""
    pf = pq.ParquetFile(inp.manifest)
    entries: list[ImageEntry] = []
    other = [c for c in pf.schema_arrow.names if c != inp.bytes_column]
    row = 0
    for batch in pf.iter_batches(batch_size=256):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            check()
            columns = {c: cols[c][i] for c in other}
            data = cols[inp.bytes_column][i] if inp.bytes_column is not None else None
            entries.append(_manifest_entry(inp, row, columns, data, cache))
            row += 1
    return entries


def _manifest_entry(inp: InputConfig, row: int, columns: dict[str, Any], data: Any, cache: HashCache) -> ImageEntry:
    """One manifest row: a file to hash, inline bytes, or an error entry labelled by its row."""
    label = columns.get(inp.id_column) if inp.id_column else None
    if inp.bytes_column is not None:
        display = str(label) if label is not None else f"{inp.manifest.name}#{row}"
        values = {**builtin_values(display), **columns}  # a manifest column named like a built-in wins
        if not isinstance(data, bytes | bytearray) or not data:
            return ImageEntry(unreadable_id(display), display, values=values, error="no image bytes")
        return ImageEntry(sha256_hex(data), display, row=row, values=values)
    raw = columns.get(inp.path_column)
    if not isinstance(raw, str) or not raw:
        display = f"{inp.manifest.name}#{row}"
        if raw is None:
            reason = "null path"
        elif raw == "":
            reason = "empty path"
        else:
            reason = f"path is not a string ({type(raw).__name__})"
        values = {**builtin_values(display), **columns}
        return ImageEntry(unreadable_id(display), display, values=values, error=reason)
    return _file_entry((inp.manifest.parent / raw).expanduser(), raw, cache, columns)


class ManifestBytes:
    """Inline image bytes of a manifest, read one row group at a time (the loader threads share it)."""

    def __init__(self, manifest: Path, column: str) -> None:
        self.pf = pq.ParquetFile(manifest)
        self.column = column
        self.starts = []
        start = 0
        for g in range(self.pf.num_row_groups):
            self.starts.append(start)
            start += self.pf.metadata.row_group(g).num_rows
        self.lock = threading.Lock()
        self.cached: tuple[int, list[bytes]] | None = None

    def get(self, row: int) -> bytes:
        g = max(i for i, s in enumerate(self.starts) if s <= row)
        with self.lock:
            if self.cached is None or self.cached[0] != g:
                values = self.pf.read_row_group(g, columns=[self.column]).column(0).to_pylist()
                self.cached = (g, values)
            return self.cached[1][row - self.starts[g]]


def build_entries(cfg: JobConfig, check: Callable[[], None] = _never_stop, persist: bool = True) -> list[ImageEntry]:
    """Every input image, hashed (the first path wins when the same bytes appear twice).

    `check` is called before each image and may raise to stop the scan (a signal: hashing 50,000 new
    photos takes minutes); the hashes computed so far are kept. `persist=False` leaves the output
    untouched (`cogbatch status` is read-only).
    """
    cache = HashCache(cfg.output)
    try:
        if cfg.input.folder:
            return folder_entries(cfg.input, cache, check)
        return manifest_entries(cfg.input, cache, check)
    finally:
        if persist:
            cache.save()


def fill_prompt(task: TaskConfig, entry: ImageEntry) -> tuple[str | None, str | None]:
    """(prompt, error): the task's prompt with this image's values, or the row's own question."""
    if task.question_column is not None:
        q = entry.values.get(task.question_column)
        if q is None or (isinstance(q, str) and not q.strip()):
            return None, f"no question in column {task.question_column!r}"
        return str(q), None
    values = {k: "" if v is None else v for k, v in entry.values.items()}
    try:
        return task.prompt.format_map(values), None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:  # e.g. {n:d} on a null value
        return None, f"cannot fill the prompt {task.prompt!r} for this row ({type(e).__name__}: {e})"


def expand_requests(entries: Iterable[ImageEntry], cfg: JobConfig, fingerprints: dict[str, str]) -> list[Request]:
    """Manifest × tasks, one request per distinct (image_id, task).

    Results are keyed by (image_id, task) (DESIGN.md: exactly once), so an image listed twice is asked
    once per task: its first row's question. When a later row of the same image would have asked
    something else (another `question_column` value or manifest `{column}` value), that is said loudly,
    since the question is lost: several questions about one image need one task each. (A copy of an
    image under another file name is just the same image: `{filename}` differing is not a question lost.)
    """
    per_row = {t.name for t in cfg.tasks if t.question_column or set(t.placeholders) - set(BUILTIN_PLACEHOLDERS)}
    first: dict[tuple[str, str], Request] = {}
    dropped: dict[str, list[tuple[ImageEntry, Request]]] = {}
    out = []
    for e in entries:
        for t in cfg.tasks:
            key = (e.image_id, t.name)
            prompt, error = fill_prompt(t, e)
            if key in first:
                if t.name in per_row and prompt is not None and prompt != first[key].prompt:
                    dropped.setdefault(t.name, []).append((e, first[key]))
                continue
            first[key] = Request(e, t, prompt, fingerprints[t.name], error)
            out.append(first[key])
    for task, lost in dropped.items():
        entry, kept = lost[0]
        log.warning(
            "task %r: %d manifest row(s) repeat an image with another question, which is not asked "
            "(e.g. %s is the same image as %s, asked %r): one row per image and task; to ask several "
            "questions about one image, give each its own task",
            task,
            len(lost),
            entry.path,
            kept.image.path,
            kept.prompt,
        )
    return out


def changed_settings(done: dict[tuple[str, str], str], fingerprints: dict[str, str]) -> dict[str, int]:
    """Tasks whose existing rows were made with other settings: task -> number of such rows."""
    changed: dict[str, int] = {}
    for (_, task), fp in done.items():
        if task in fingerprints and fp != fingerprints[task]:
            changed[task] = changed.get(task, 0) + 1
    return changed


def pending(requests: list[Request], done: dict[tuple[str, str], str], redo_changed: bool) -> list[Request]:
    """Requests without a current row: never done, or (with redo_changed) done with other settings."""
    out = []
    for r in requests:
        fp = done.get((r.image.image_id, r.task.name))
        if fp is None or (redo_changed and fp != r.fingerprint):
            out.append(r)
    return out


def limit_images(requests: list[Request], limit: int | None) -> list[Request]:
    """At most `limit` distinct images, in order (all of their tasks)."""
    if limit is None:
        return requests
    keep: dict[str, None] = {}
    out = []
    for r in requests:
        if r.image.image_id not in keep:
            if len(keep) >= limit:
                continue
            keep[r.image.image_id] = None
        out.append(r)
    return out

"""What there is to do: the images of a folder or a Parquet manifest, and which (image, task) pairs are pending.

Images are identified by the sha256 of their bytes, so a renamed file is not redone and an edited
one is. Hashing 50,000 photos every night would cost more than the new work, so hashes are cached
per (path, size, mtime) in the output directory; only new or changed files are read.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.config import InputConfig, JobConfig, TaskConfig

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


def _file_entry(path: Path, display: str, cache: HashCache, values: dict[str, Any]) -> ImageEntry:
    values = {"filename": path.name, "stem": path.stem, "folder": path.parent.name, **values}
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


def folder_entries(inp: InputConfig, cache: HashCache) -> list[ImageEntry]:
    return [_file_entry(p, str(p), cache, {}) for p in scan_folder(inp)]


def manifest_entries(inp: InputConfig, cache: HashCache) -> list[ImageEntry]:
    """One entry per manifest row; paths resolve relative to the manifest's directory."""
    pf = pq.ParquetFile(inp.manifest)
    base = inp.manifest.parent
    entries: list[ImageEntry] = []
    other = [c for c in pf.schema_arrow.names if c != inp.bytes_column]
    row = 0
    for batch in pf.iter_batches(batch_size=256):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            values = {c: cols[c][i] for c in other}
            label = values.get(inp.id_column) if inp.id_column else None
            if inp.bytes_column is not None:
                data = cols[inp.bytes_column][i]
                display = str(label) if label is not None else f"{inp.manifest.name}#{row}"
                if not isinstance(data, bytes | bytearray) or not data:
                    entries.append(ImageEntry(unreadable_id(display), display, values=values, error="no image bytes"))
                else:
                    entries.append(ImageEntry(sha256_hex(data), display, row=row, values=values))
            else:
                raw = values.get(inp.path_column)
                if not isinstance(raw, str) or not raw:
                    display = f"{inp.manifest.name}#{row}"
                    reason = "null path" if raw is None else f"path is not a string ({type(raw).__name__})"
                    entries.append(ImageEntry(unreadable_id(display), display, values=values, error=reason))
                else:
                    path = (base / raw).expanduser()
                    entries.append(_file_entry(path, raw, cache, values))
            row += 1
    return entries


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


def build_entries(cfg: JobConfig) -> list[ImageEntry]:
    """Every input image once (the first path wins when the same bytes appear twice)."""
    cache = HashCache(cfg.output)
    entries = folder_entries(cfg.input, cache) if cfg.input.folder else manifest_entries(cfg.input, cache)
    cache.save()
    return entries


def fill_prompt(task: TaskConfig, entry: ImageEntry) -> tuple[str | None, str | None]:
    """(prompt, error): the task's prompt with this image's values, or the row's own question."""
    if task.question_column is not None:
        q = entry.values.get(task.question_column)
        if q is None or (isinstance(q, str) and not q.strip()):
            return None, f"no question in column {task.question_column!r}"
        return str(q), None
    values = {k: "" if v is None else v for k, v in entry.values.items()}
    return task.prompt.format_map(values), None


def expand_requests(entries: Iterable[ImageEntry], cfg: JobConfig, fingerprints: dict[str, str]) -> list[Request]:
    """Manifest × tasks, one request per distinct (image_id, task)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for e in entries:
        for t in cfg.tasks:
            key = (e.image_id, t.name)
            if key in seen:
                continue
            seen.add(key)
            prompt, error = fill_prompt(t, e)
            out.append(Request(e, t, prompt, fingerprints[t.name], error))
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

"""Hashes of the input's files, cached per (path, size, mtime) beside the results.

Hashing 50,000 photos every night would cost more than the new work, so only new or changed files are
read; the cache is a Parquet file written atomically, and a missing or damaged one just starts empty.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.fsio import atomic_file

HASH_CACHE = Path(".cogbatch") / "hashes.parquet"
_HASH_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("image_id", pa.string())]
)


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
        with atomic_file(self.file) as f:
            pq.write_table(table, f)
        self.dirty = False

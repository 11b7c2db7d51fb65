"""The thumbnail cache beside the page: one small JPEG per (image id, size), made once, in parallel.

Layout: `<cache>/<size>/<first two hex digits>/<image id>.jpg`, and `<image id>.err` (the reason, as
text) for bytes that do not decode. The key is the image id, the sha256 of the bytes, so a thumbnail
never goes stale: an edited image has another id and gets its own. A failure of the bytes themselves
(corrupt, truncated, too large) is remembered the same way and never decoded again; a failure of the
file (missing, unreadable, or now holding other bytes than the row's) is not, since it may be fixed.

Decoding goes through `cogbatch.inputs.decode` (size limit from the header before any pixel, EXIF
orientation, alpha on white), so a broken or huge image gives a reason, never an exception. Pillow
releases the GIL while it decodes, scales and encodes, so a few threads make thumbnails in parallel;
at most `2 * workers` images are in flight, which bounds memory whatever the collection's size.
Files are written to a temp name and renamed, without fsync: this is a cache, and a lost thumbnail
is made again by the next build.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from cogbatch.fsio import atomic_write
from cogbatch.inputs.decode import DEFAULT_MAX_PIXELS, ImageError, decode_image, read_image_bytes

log = logging.getLogger("cogbatch")

JPEG_QUALITY = 82
_HEX_ID = re.compile(r"[0-9a-f]{64}")
CHANGED = "the file no longer holds the bytes of this row (edited or replaced since)"
NOT_AN_ID = "no thumbnail: the row's image_id is not a sha256"


@dataclass(frozen=True)
class Thumb:
    """A thumbnail (`name`, relative to the cache's size folder), or why there is none."""

    name: str | None
    reason: str | None = None
    made: bool = False  # decoded by this build (False: found in the cache, or no bytes to decode)


@dataclass
class ThumbStats:
    made: int = 0  # decoded and written now
    reused: int = 0  # found in the cache
    failed: int = 0  # placeholders (bytes that do not decode, a missing file...)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class ThumbCache:
    """Thumbnails of one size under `root`; see the module docstring."""

    def __init__(self, root: Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not 16 <= size <= 2048:
            raise ValueError(f"thumbnail size must be 16 to 2048 pixels, got {size}")
        self.root = root
        self.size = size
        self.dir = root / str(size)
        self.max_pixels = max_pixels

    def name(self, image_id: str) -> str | None:
        """`ab/abcd….jpg`; None for an id that is not a sha256 (it must never become a path)."""
        if not _HEX_ID.fullmatch(image_id):
            return None
        return f"{image_id[:2]}/{image_id}.jpg"

    def lookup(self, image_ids: Iterable[str]) -> dict[str, Thumb]:
        """What the cache already holds for these ids: one directory listing per shard, not a stat per image."""
        listed: dict[str, set[str]] = {}
        found: dict[str, Thumb] = {}
        for image_id in image_ids:
            name = self.name(image_id)
            if name is None:
                found[image_id] = Thumb(None, NOT_AN_ID)
                continue
            shard = image_id[:2]
            if shard not in listed:
                try:
                    listed[shard] = set(os.listdir(self.dir / shard))
                except (FileNotFoundError, NotADirectoryError):
                    listed[shard] = set()
            if f"{image_id}.jpg" in listed[shard]:
                found[image_id] = Thumb(name)
            elif f"{image_id}.err" in listed[shard]:
                found[image_id] = Thumb(None, self._read_reason(image_id))
        return found

    def _read_reason(self, image_id: str) -> str:
        try:
            return (self.dir / image_id[:2] / f"{image_id}.err").read_text(encoding="utf-8").strip() or "not decodable"
        except (OSError, UnicodeDecodeError):
            return "not decodable"

    def make(self, image_id: str, read: Callable[[], bytes]) -> Thumb:
        """Read, check, decode and write one thumbnail. OSError only when the cache cannot be written."""
        name = self.name(image_id)
        if name is None:
            return Thumb(None, NOT_AN_ID)
        try:
            data = read()
        except ImageError as e:  # missing, unreadable: the file's state, not the bytes', so not remembered
            return Thumb(None, e.reason)
        if hashlib.sha256(data).hexdigest() != image_id:
            return Thumb(None, CHANGED)
        try:
            decoded = decode_image(data, max_pixels=self.max_pixels, draft=(self.size, self.size))
        except ImageError as e:  # the bytes' own failure: remembered, never decoded again
            self._write(image_id[:2], f"{image_id}.err", e.reason.encode("utf-8"))
            return Thumb(None, e.reason, made=True)
        image = decoded.image
        from PIL import Image

        image.thumbnail((self.size, self.size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=JPEG_QUALITY)
        self._write(image_id[:2], f"{image_id}.jpg", buf.getvalue())
        return Thumb(name, made=True)

    def _write(self, shard: str, filename: str, data: bytes) -> None:
        folder = self.dir / shard
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / filename, data, durable=False)

    def make_all(
        self, jobs: Iterable[tuple[str, Callable[[], bytes]]], total: int, workers: int | None = None
    ) -> dict[str, Thumb]:
        """Make the thumbnails of (image id, read bytes) jobs with `workers` threads; logs progress every 10 s."""
        workers = workers or default_workers()
        results: dict[str, Thumb] = {}
        pending: dict[Future[Thumb], str] = {}
        last_log = time.monotonic()

        def collect(block: bool) -> None:
            nonlocal last_log
            done, _ = wait(pending, return_when=FIRST_COMPLETED) if block else (list(pending), None)
            for future in done:
                results[pending.pop(future)] = future.result()  # re-raises OSError (cache not writable)
            if total and time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("thumbnails: %d/%d made", len(results), total)

        with ThreadPoolExecutor(workers, thread_name_prefix="cogbatch-thumb") as pool:
            try:
                for image_id, read in jobs:
                    pending[pool.submit(self.make, image_id, read)] = image_id
                    if len(pending) >= 2 * workers:
                        collect(block=True)
                while pending:
                    collect(block=True)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        return results


# -- where the bytes come from -------------------------------------------------------------------


def file_reader(path: str | os.PathLike[str]) -> Callable[[], bytes]:
    """Read a file the project's safe way (regular files only, size cap): ImageError with a reason."""
    return lambda: read_image_bytes(path)


def manifest_jobs(manifest: Path, column: str, wanted: set[str]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(image id, bytes) of the wanted images stored inside a Parquet manifest, found by hashing each row.

    Rows are read one batch at a time and only the wanted bytes are handed on, so a manifest of
    millions of images is scanned in bounded memory. Stops early once every wanted image was found.
    """
    import pyarrow.parquet as pq

    left = set(wanted)
    with pq.ParquetFile(manifest) as pf:
        for batch in pf.iter_batches(batch_size=64, columns=[column]):
            for data in batch.column(0).to_pylist():
                if not isinstance(data, bytes | bytearray) or not data:
                    continue
                image_id = hashlib.sha256(data).hexdigest()
                if image_id in left:
                    left.discard(image_id)
                    yield image_id, (lambda d=bytes(data): d)
            if not left:
                return

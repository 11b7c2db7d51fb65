"""Images on their way to the model: read, verified, decoded and preprocessed by loader threads.

Every failure is a reason on the image (an error row later), never an exception; at most a window of
images is decoded ahead of the model, which bounds host memory (a CogVLM2 image is 21.7 MB of float32
pixels and chunks hold up to 64 images).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cogbatch.errors import ImageError
from cogbatch.inputs.decode import decode_image, read_image_bytes
from cogbatch.inputs.entries import ImageEntry, sha256_hex
from cogbatch.inputs.manifest import ManifestBytes

if TYPE_CHECKING:
    from cogbatch.job.config import JobConfig


@dataclass
class LoadedImage:
    entry: ImageEntry
    pixels: Any = None  # (3, S, S) float tensor
    width: int | None = None
    height: int | None = None
    error: str | None = None


def load_entry(entry: ImageEntry, cfg: JobConfig, image_size: int, inline: ManifestBytes | None) -> LoadedImage:
    """Read, verify, decode and preprocess one image; every failure is a reason, never an exception."""
    from cogbatch.model.preprocess import preprocess_image

    if entry.error:
        return LoadedImage(entry, error=entry.error)
    try:
        data = inline.get(entry.row) if entry.row is not None else read_image_bytes(entry.file)
        if sha256_hex(data) != entry.image_id:
            raise ImageError("file changed during the run (it will be done on the next run)")
        decoded = decode_image(data, max_pixels=cfg.max_pixels)
        pixels = preprocess_image(decoded.image, image_size)
        return LoadedImage(entry, pixels, decoded.width, decoded.height)
    except ImageError as e:
        return LoadedImage(entry, error=str(e))


def prefetch(entries: list[ImageEntry], cfg: JobConfig, image_size: int, chunk: int) -> Iterator[LoadedImage]:
    """Images in order, decoded by background threads at most `window` images ahead of the model."""
    inline = ManifestBytes(cfg.input.manifest, cfg.input.bytes_column) if cfg.input.bytes_column else None
    window = max(chunk, 2 * cfg.loader_threads)
    with ThreadPoolExecutor(cfg.loader_threads, thread_name_prefix="cogbatch-load") as pool:
        queue: list[Future] = []
        it = iter(entries)
        for e in it:
            queue.append(pool.submit(load_entry, e, cfg, image_size, inline))
            if len(queue) >= window:
                break
        while queue:
            result = queue.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(load_entry, nxt, cfg, image_size, inline))
            yield result

"""`build_gallery`: the output's rows, their thumbnails and one HTML page, written where the user looks.

The page is written to a temp name and renamed, so a browser (or a morning reader of a nightly job's
page) never sees half a page; thumbnails live in `thumbs/` beside it, a cache that later builds reuse.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogbatch.fsio import atomic_file
from cogbatch.gallery.build import Card, Filters, GalleryError, load_page
from cogbatch.job import JobConfig

if TYPE_CHECKING:
    from cogbatch.results import RunSummary

log = logging.getLogger("cogbatch")

THUMBS_DIR = "thumbs"  # beside the page
DEFAULT_THUMB_SIZE = 256
DEFAULT_PAGE_SIZE = 200


def default_dest(output: str | os.PathLike[str]) -> Path:
    """Where the gallery of an output goes unless told: `<output>.cogbatch/gallery/index.html`.

    Beside the output, not in it, so that the output folder holds only its Parquet parts.
    """
    output = Path(output)
    return output.with_name(output.name + ".cogbatch") / "gallery" / "index.html"


@dataclass(frozen=True)
class GalleryResult:
    """What a build wrote; `to_dict()` for --json, `describe()` for people."""

    page: Path
    output: Path
    images: int  # cards on the page
    rows: int  # rows on the page
    errors: int  # of `rows`, error rows
    matched_images: int  # images that pass the filters (before --limit)
    thumbnails_made: int  # decoded by this build
    thumbnails_reused: int  # found in the cache
    placeholders: int  # images shown without a thumbnail, with the reason
    page_bytes: int
    seconds: float
    filters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.page.resolve().as_uri()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(page=str(self.page), output=str(self.output), url=self.url)
        return d

    def describe(self) -> str:
        limited = f" (of {self.matched_images:,} matching)" if self.matched_images != self.images else ""
        counts = f"{_n(self.images, 'image')}{limited}, {_n(self.rows, 'row')} ({_n(self.errors, 'error')})"
        lines = [
            f"gallery: {counts} -> {self.page}",
            f"thumbnails: {self.thumbnails_made:,} made, {self.thumbnails_reused:,} reused, "
            f"{_n(self.placeholders, 'placeholder')}; page {self.page_bytes / 2**20:.1f} MiB, {self.seconds:.1f} s",
            f"open {self.url}",
        ]
        return "\n".join([*(f"warning: {w}" for w in self.warnings), *lines])


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def build_gallery(
    cfg: JobConfig,
    dest: str | os.PathLike[str] | None = None,
    *,
    task: str | None = None,
    status: str = "all",
    limit: int | None = None,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    page_size: int = DEFAULT_PAGE_SIZE,
    workers: int | None = None,
) -> GalleryResult:
    """Write the gallery of `cfg`'s output to `dest` (default: `default_dest`) and its thumbnails beside it.

    GalleryError (a UserError: exit 2) for an output without results, an unknown task, or a
    destination that cannot be written. Images that cannot be shown get a placeholder with the reason.
    """
    from cogbatch.gallery import html
    from cogbatch.gallery.thumbs import ThumbCache

    started = time.perf_counter()
    page_path = Path(dest) if dest is not None else default_dest(cfg.output)
    if page_path.is_dir():
        raise GalleryError(f"--dest {page_path} is a directory; name the page's file, e.g. {page_path}/index.html")
    _check_outside_input(cfg, page_path.parent / THUMBS_DIR)
    if not 1 <= page_size <= 10_000:
        raise GalleryError(f"page size must be 1 to 10000 images, got {page_size}")
    warnings: list[str] = []
    page = load_page(cfg, Filters(task, status, limit), warn=warnings.append)
    folder = page_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cache = ThumbCache(folder / THUMBS_DIR, thumb_size, cfg.max_pixels)
        made, reused, failed = _thumbnails(cfg, page.cards, cache, workers)
        size = _write_page(page_path, lambda out: html.render(page, out, page_size=page_size))
    except OSError as e:  # read-only or full disk, a file in the way
        raise GalleryError(f"cannot write {e.filename or folder}: {e.strerror or e}") from None
    return GalleryResult(
        page=page_path,
        output=cfg.output,
        images=len(page.cards),
        rows=page.rows,
        errors=sum(r.status == "error" for c in page.cards for r in c.rows),
        matched_images=page.matched_images,
        thumbnails_made=made,
        thumbnails_reused=reused,
        placeholders=failed,
        page_bytes=size,
        seconds=round(time.perf_counter() - started, 3),
        filters=page.filters.to_dict(),
        warnings=warnings,
    )


def _check_outside_input(cfg: JobConfig, thumbs: Path) -> None:
    """Thumbnails inside a folder the job scans would be captioned by its next run, as images of the input."""
    folder = cfg.input.folder
    if folder is None or not cfg.input.recursive:
        return
    inside = os.path.realpath(thumbs)
    root = os.path.realpath(folder)
    if inside == root or inside.startswith(root.rstrip(os.sep) + os.sep):
        raise GalleryError(
            f"--dest {thumbs.parent}: its thumbnails would go under the job's input folder {folder}, and the next "
            "run would caption them; put the page outside it"
        )


def _thumbnails(cfg: JobConfig, cards: list[Card], cache: Any, workers: int | None) -> tuple[int, int, int]:
    """Fill each card's thumbnail URL or its reason; (made now, reused, placeholders)."""
    from cogbatch.gallery.thumbs import Thumb, file_reader, manifest_jobs

    by_id: dict[str, list[Card]] = {}
    for card in cards:
        by_id.setdefault(card.image_id, []).append(card)
    found = cache.lookup(by_id)
    reused = sum(t.name is not None for t in found.values())
    todo = [image_id for image_id in by_id if image_id not in found]
    if cfg.input.bytes_column is not None:
        jobs = manifest_jobs(cfg.input.manifest, cfg.input.bytes_column, set(todo))
    else:
        jobs = ((i, file_reader(by_id[i][0].file)) for i in todo if by_id[i][0].file is not None)
    found.update(cache.make_all(jobs, total=len(todo), workers=workers))
    made = 0
    for image_id, group in by_id.items():
        thumb = found.get(image_id) or Thumb(None, _no_bytes(cfg, group[0]))
        made += thumb.made and thumb.name is not None
        for card in group:
            card.thumb = f"{THUMBS_DIR}/{cache.size}/{thumb.name}" if thumb.name else None
            card.thumb_error = thumb.reason if thumb.name is None else None
    failed = sum(c.thumb is None for c in cards)
    return made, reused, failed


def _no_bytes(cfg: JobConfig, card: Card) -> str:
    if cfg.input.bytes_column is not None:
        return f"not in the manifest {cfg.input.manifest.name} now (its bytes changed or the row was removed)"
    return "no image file for this row"


def _write_page(target: Path, render: Any) -> int:
    """Write through a temp file renamed into place; returns the page's size in bytes."""
    with atomic_file(target, "w", encoding="utf-8", newline="\n") as out:
        render(out)
    return target.stat().st_size


def refresh_after_run(cfg: JobConfig, summary: RunSummary) -> dict[str, Any]:
    """Rebuild the default gallery after a run (`run --gallery`, job key `gallery: true`).

    Never raises an Exception: the run's rows are written and its exit code stands, so a gallery
    problem is a warning and a `{"error": ...}` entry in the summary. An interrupted run is left
    alone: whoever stopped it wants the process to end.
    """
    if summary.interrupted:
        return {"skipped": "the run was interrupted"}
    try:
        result = build_gallery(cfg)
    except Exception as e:
        log.warning("gallery not refreshed: %s", e)
        return {"error": str(e)}
    log.info("gallery: %s (%d images, %d thumbnails made)", result.page, result.images, result.thumbnails_made)
    return result.to_dict()

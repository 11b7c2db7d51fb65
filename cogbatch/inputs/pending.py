"""What there is to do: image x task requests, and which of them are pending given the rows already made.

Results are keyed by (image_id, task) (exactly once), so an image listed twice is asked once per task.
Computed identically for every engine, before any model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cogbatch.inputs.entries import BUILTIN_PLACEHOLDERS, ImageEntry, folder_entries, never_stop
from cogbatch.inputs.hashes import HashCache
from cogbatch.inputs.manifest import manifest_entries

if TYPE_CHECKING:
    from cogbatch.job.config import JobConfig, TaskConfig

log = logging.getLogger("cogbatch")


@dataclass
class PendingWork:
    """What a run will do: the input's images and requests, and the requests still to do (in order, after --limit)."""

    images: int  # distinct input images
    requests_total: int  # images x tasks
    skipped: int  # requests whose current row is already in the output
    todo: list[Request]

    @property
    def image_ids(self) -> set[str]:
        return {r.image.image_id for r in self.todo}


def find_pending(
    cfg: JobConfig,
    fingerprints: dict[str, str],
    done: dict[tuple[str, str], str],
    redo_changed: bool = False,
    check: Callable[[], None] = never_stop,
) -> PendingWork:
    """Pending work = images x tasks - the rows in `done` (with `redo_changed`: those with other settings too).

    `check` is called per image scanned and may raise (a signal while hashing: the hashes so far are kept).
    """
    entries = build_entries(cfg, check)
    requests = expand_requests(entries, cfg, fingerprints)
    open_requests = pending(requests, done, redo_changed)
    todo = limit_images(open_requests, cfg.limit)
    images = len({e.image_id for e in entries})
    return PendingWork(images, len(requests), len(requests) - len(open_requests), todo)


@dataclass
class Request:
    image: ImageEntry
    task: TaskConfig
    prompt: str | None  # the filled prompt; None when the question is missing (then `error` says why)
    fingerprint: str
    error: str | None = None


def build_entries(cfg: JobConfig, check: Callable[[], None] = never_stop, persist: bool = True) -> list[ImageEntry]:
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

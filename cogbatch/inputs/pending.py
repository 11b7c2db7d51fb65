"""What there is to do: item x task requests, and which of them are pending given the rows already made.

An item is a file of a folder or a row of a manifest; it is keyed by its path (a manifest row without a
path: its label), and results by (path, task): every item gets its own row per task, and the row's
image id says whether it still describes what the path holds. Byte-identical items asked the same
question with the same settings are generated once: the first pending one generates, the others are its
copies and get its text (`engines.reuse`); an item whose bytes and question already have an ok row in the
output is not generated at all. Computed identically for every engine, before any model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cogbatch.inputs.entries import ImageEntry, folder_entries, never_stop
from cogbatch.inputs.hashes import HashCache
from cogbatch.inputs.manifest import manifest_entries

if TYPE_CHECKING:
    from cogbatch.job.config import JobConfig, TaskConfig
    from cogbatch.store.read import CurrentRow

log = logging.getLogger("cogbatch")

Key = tuple[str, str]  # (path, task): what a row answers for
ReuseKey = tuple[str, str, str, "str | None"]  # (image id, task, fingerprint, prompt): what makes the same text


@dataclass
class Request:
    image: ImageEntry
    task: TaskConfig
    prompt: str | None  # the filled prompt; None when the question is missing (then `error` says why)
    fingerprint: str
    error: str | None = None

    @property
    def key(self) -> Key:
        return (self.image.path, self.task.name)

    @property
    def reuse_key(self) -> ReuseKey:
        return (self.image.image_id, self.task.name, self.fingerprint, self.prompt)

    @property
    def known_error(self) -> str | None:
        """Why the request fails before any decoding (a missing file, no question), or None."""
        return self.image.error or self.error


@dataclass
class PendingWork:
    """What a run will do: the input's items and requests, and the requests still to do (after --limit)."""

    items: int  # files of the folder, or manifest rows (one per path)
    distinct_images: int  # distinct image ids among them
    requests_total: int  # items x tasks
    skipped: int  # requests whose current row is already in the output
    todo: list[Request]  # one request per generation (or known error), in order
    copies: dict[Key, list[Request]] = field(default_factory=dict)  # todo key -> byte-identical items asking the same
    reused: list[tuple[Request, dict[str, Any]]] = field(default_factory=list)  # answered by an ok row of the output
    current_errors: int = 0  # skipped requests whose current row is an error

    @property
    def image_ids(self) -> set[str]:
        return {r.image.image_id for r in self.todo}

    @property
    def pending(self) -> int:
        """Requests this run gives a row: generated, copied from this run's generation, or reused."""
        return len(self.todo) + sum(map(len, self.copies.values())) + len(self.reused)


def find_pending(
    cfg: JobConfig,
    fingerprints: dict[str, str],
    current: dict[Key, CurrentRow],
    *,
    redo_changed: bool = False,
    retry_errors: bool = False,
    reusable: Callable[[set[ReuseKey]], dict[ReuseKey, dict[str, Any]]] = lambda wanted: {},
    check: Callable[[], None] = never_stop,
) -> PendingWork:
    """Pending work = items x tasks - the requests with a current row (see `pending`), at most `cfg.limit`
    images, each generation once (`share_generations`; `reusable` finds the output's rows for them).

    `check` is called per image scanned and may raise (a signal while hashing: the hashes so far are kept).
    """
    entries = build_entries(cfg, check)
    requests = expand_requests(entries, cfg, fingerprints)
    open_requests, current_errors = pending(requests, current, redo_changed, retry_errors)
    skipped = len(requests) - len(open_requests)
    todo, copies, reused = share_generations(limit_images(open_requests, cfg.limit), reusable)
    items = len({e.path for e in entries})
    distinct = len({e.image_id for e in entries})
    return PendingWork(items, distinct, len(requests), skipped, todo, copies, reused, current_errors)


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
    """Items × tasks, one request per (path, task).

    A manifest may list one path on several rows: they are one item, asked its first row's question. When
    a later row would have asked something else (another `question_column` value, other bytes under one
    label), that is said loudly, since the question is lost: several questions about one image need one
    task each, or the image under other paths. (Byte-identical files under other paths are items of their
    own: each gets its row, and the generation is shared when the question is the same.)
    """
    first: dict[Key, Request] = {}
    dropped: dict[str, list[tuple[ImageEntry, Request]]] = {}
    out = []
    for e in entries:
        for t in cfg.tasks:
            key = (e.path, t.name)
            prompt, error = fill_prompt(t, e)
            if key in first:
                kept = first[key]
                if kept.image.image_id != e.image_id or (prompt is not None and prompt != kept.prompt):
                    dropped.setdefault(t.name, []).append((e, kept))
                continue
            first[key] = Request(e, t, prompt, fingerprints[t.name], error)
            out.append(first[key])
    for task, lost in dropped.items():
        entry, kept = lost[0]
        log.warning(
            "task %r: %d manifest row(s) repeat the path of an earlier row with another question or other bytes, "
            "which is not asked (e.g. %s, asked %r): one row per path and task; to ask several questions "
            "about one image, give each its own task",
            task,
            len(lost),
            entry.path,
            kept.prompt,
        )
    return out


def changed_settings(current: dict[Key, CurrentRow], fingerprints: dict[str, str]) -> dict[str, int]:
    """Tasks whose current rows were made with other settings: task -> number of such rows."""
    changed: dict[str, int] = {}
    for (_, task), row in current.items():
        if task in fingerprints and row.fingerprint != fingerprints[task]:
            changed[task] = changed.get(task, 0) + 1
    return changed


def pending(
    requests: list[Request], current: dict[Key, CurrentRow], redo_changed: bool, retry_errors: bool = False
) -> tuple[list[Request], int]:
    """(requests without a current row, current error rows among the others).

    A request's row is current when its path's newest row describes the bytes the path holds now (same
    image id: an edited file is redone) with this task's settings (with `redo_changed`, other settings
    are redone) and did not end as an error (with `retry_errors`, error rows are redone).
    """
    out, errors = [], 0
    for r in requests:
        row = current.get(r.key)
        if (
            row is None
            or row.image_id != r.image.image_id
            or (redo_changed and row.fingerprint != r.fingerprint)
            or (retry_errors and row.status != "ok")
        ):
            out.append(r)
        else:
            errors += row.status != "ok"
    return out, errors


def share_generations(
    requests: list[Request], reusable: Callable[[set[ReuseKey]], dict[ReuseKey, dict[str, Any]]]
) -> tuple[list[Request], dict[Key, list[Request]], list[tuple[Request, dict[str, Any]]]]:
    """(requests to generate, their copies, requests answered by the output's rows).

    Requests of byte-identical items that ask the same question with the same settings make the same
    text: the first generates, the others copy its row; when the output already holds an ok row made so
    (`reusable`), none generates. Requests known to fail (a missing file, no question) are not shared:
    their reasons may differ.
    """
    found = reusable({r.reuse_key for r in requests if not r.known_error})
    todo: list[Request] = []
    copies: dict[Key, list[Request]] = {}
    reused: list[tuple[Request, dict[str, Any]]] = []
    first: dict[ReuseKey, Request] = {}
    for r in requests:
        if r.known_error:
            todo.append(r)
        elif r.reuse_key in found:
            reused.append((r, found[r.reuse_key]))
        elif r.reuse_key in first:
            copies.setdefault(first[r.reuse_key].key, []).append(r)
        else:
            first[r.reuse_key] = r
            todo.append(r)
    return todo, copies, reused


def limit_images(requests: list[Request], limit: int | None) -> list[Request]:
    """At most `limit` distinct images, in order (all of their items and tasks)."""
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

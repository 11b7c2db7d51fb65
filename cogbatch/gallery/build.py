"""Result rows -> the page model: one card per image with its current row per task, and the header's facts.

The gallery shows what the dataset answers now: `store.latest_rows`, one row per (image, task), so a
retried error or a redone caption shows its newest row only. Cards are grouped by image id (the bytes),
not by path, because that is what a row describes; they are sorted by path so that a folder reads in
order. The page model is plain data (no HTML): `html.py` renders it, tests inspect it.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogbatch.errors import GalleryError
from cogbatch.job import JobConfig

STATUS_CHOICES = ("ok", "error", "all")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# What the page needs of a row; fingerprint and run_id stay in the Parquet.
COLUMNS = [
    "image_id",
    "path",
    "task",
    "prompt",
    "text",
    "status",
    "error",
    "finish_reason",
    "tokens_in",
    "tokens_out",
    "width",
    "height",
    "model",
    "quant",
    "created_at",
    "attempts",
]


@dataclass(frozen=True)
class Filters:
    """What `--task`, `--status` and `--limit` keep: rows of one task, rows of one status, the first N images."""

    task: str | None = None
    status: str = "all"
    limit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "status": self.status, "limit": self.limit}

    def describe(self) -> str:
        parts = [f"task {self.task}" if self.task else "", f"{self.status} rows" if self.status != "all" else ""]
        parts.append(f"first {self.limit} images" if self.limit else "")
        return ", ".join(p for p in parts if p)


@dataclass
class Row:
    """One task's current row of an image, as the page shows it."""

    task: str
    status: str
    text: str | None
    error: str | None
    finish_reason: str | None
    tokens_in: int | None
    tokens_out: int | None
    prompt: str | None
    created_at: str  # "YYYY-MM-DD HH:MM" UTC
    attempts: int | None
    variant: str  # "model · quant"


@dataclass
class Card:
    """One image: where it is, its rows in task order, and (filled in later) its thumbnail or why none."""

    image_id: str
    path: str | None
    width: int | None
    height: int | None
    rows: list[Row]
    file: str | None = None  # where its bytes can be read now (None: no file, e.g. bytes in a manifest)
    thumb: str | None = None  # URL of the thumbnail, relative to the page
    thumb_error: str | None = None  # why there is no thumbnail


@dataclass
class TaskTotals:
    ok: int = 0
    error: int = 0
    finish: dict[str, int] = field(default_factory=dict)  # finish_reason -> rows
    prompts: set[str] = field(default_factory=set)
    tokens_out: int = 0


@dataclass
class PageModel:
    """Everything the page shows; `cards` is the filtered, sorted, limited selection."""

    output: Path
    tasks: list[str]  # every task, the job's first, then tasks only the output knows
    totals: dict[str, TaskTotals]  # per task, over the whole dataset (before filters)
    images: int  # distinct images in the dataset
    variants: dict[str, int]  # "model · quant" -> rows
    first_row: dt.datetime | None
    last_row: dt.datetime | None
    runs: list[dict[str, Any]]  # the run history, oldest first
    filters: Filters
    cards: list[Card]
    matched_images: int  # images that pass the filters, before the limit

    @property
    def rows(self) -> int:
        return sum(len(c.rows) for c in self.cards)


def check_request(cfg: JobConfig, filters: Filters) -> None:
    """Refuse a request that can never give a page, before anything is read or written."""
    if filters.status not in STATUS_CHOICES:
        raise GalleryError(f"--status must be one of {', '.join(STATUS_CHOICES)} (got {filters.status!r})")
    if filters.limit is not None and filters.limit < 1:
        raise GalleryError(f"--limit must be a positive number of images (got {filters.limit})")
    from cogbatch.store import list_parts

    if not list_parts(cfg.output):
        raise GalleryError(f"no results in {cfg.output}; has the job run?")


def image_file(cfg: JobConfig, path: str | None) -> str | None:
    """Where the bytes of a row's image are read from: its path as the input scan wrote it.

    A folder input records absolute paths; a manifest's path column is relative to the manifest's
    directory. Images that are bytes inside a manifest have a label, not a file. Strings, not Paths:
    a Path per image costs a second at 50,000 images.
    """
    if path is None or cfg.input.bytes_column is not None:
        return None
    if cfg.input.manifest is not None:
        return os.path.expanduser(os.path.join(cfg.input.manifest.parent, path))
    return path


@functools.lru_cache(maxsize=4096)
def _minute(minutes: int) -> str:
    """Minutes since the epoch as YYYY-MM-DD HH:MM (UTC); cached, since the rows of a run share a few minutes
    (a datetime per row costs a second at 50,000 rows)."""
    return (_EPOCH + dt.timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M")


def load_page(cfg: JobConfig, filters: Filters, warn: Callable[[str], None] | None = None) -> PageModel:
    """Read the output and build the page model; GalleryError for an unknown task or an empty output."""
    import pyarrow.compute as pc

    from cogbatch.history import read_history
    from cogbatch.store import latest_rows, read_results

    check_request(cfg, filters)
    latest = latest_rows(read_results(cfg.output, COLUMNS))
    if latest.num_rows == 0:
        raise GalleryError(f"no results in {cfg.output}; has the job run?")
    job_tasks = [t.name for t in cfg.tasks]
    found = set(latest["task"].unique().to_pylist())
    tasks = job_tasks + sorted(found - set(job_tasks))  # a task dropped from the job still has rows
    if filters.task is not None and filters.task not in tasks:
        raise GalleryError(f"--task {filters.task!r} is neither a task of this job nor in its output "
                           f"(tasks: {', '.join(tasks)})")  # fmt: skip

    totals = _totals(latest, tasks)
    variants = _variants(latest)
    first, last = pc.min_max(latest["created_at"]).values()
    images = pc.count_distinct(latest["image_id"]).as_py()

    kept = latest
    if filters.task is not None:
        kept = kept.filter(pc.equal(kept["task"], filters.task))
    if filters.status != "all":
        kept = kept.filter(pc.equal(kept["status"], filters.status))
    # By path, then image id (the same path with other bytes: an edited image), then the job's task order.
    rank = {name: i for i, name in enumerate(tasks)}
    order = _page_order(kept, rank)
    cards, matched = _cards(cfg, kept.take(order), filters.limit)
    return PageModel(
        output=cfg.output,
        tasks=tasks,
        totals=totals,
        images=images,
        variants=variants,
        first_row=first.as_py(),
        last_row=last.as_py(),
        runs=read_history(cfg.output, warn=warn),
        filters=filters,
        cards=cards,
        matched_images=matched,
    )


def _page_order(table: Any, rank: dict[str, int]) -> Any:
    """Row order of the page: path (rows without one last), image id, the job's task order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    task_rank = pa.array([rank[t] for t in table["task"].to_pylist()], pa.int32())
    keys = pa.table({"path": table["path"], "image_id": table["image_id"], "task": task_rank})
    sort_keys = [("path", "ascending"), ("image_id", "ascending"), ("task", "ascending")]
    return pc.sort_indices(keys, sort_keys=sort_keys)  # nulls (no path) sort last by default


def _totals(latest: Any, tasks: list[str]) -> dict[str, TaskTotals]:
    totals = {name: TaskTotals() for name in tasks}
    cols = latest.select(["task", "status", "finish_reason", "prompt", "tokens_out"]).to_pydict()
    for task, status, finish, prompt, tokens in zip(*cols.values(), strict=True):
        t = totals[task]
        if status == "ok":
            t.ok += 1
        else:
            t.error += 1
        if finish is not None:
            t.finish[finish] = t.finish.get(finish, 0) + 1
        if prompt is not None and len(t.prompts) < 2:  # only "one prompt or several" is shown
            t.prompts.add(prompt)
        t.tokens_out += tokens or 0
    return totals


def variant_of(model: str | None, quant: str | None) -> str:
    return f"{model or 'unknown model'} · {quant or 'unknown quantization'}"


def _variants(latest: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for model, quant in zip(latest["model"].to_pylist(), latest["quant"].to_pylist(), strict=True):
        key = variant_of(model, quant)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _cards(cfg: JobConfig, table: Any, limit: int | None) -> tuple[list[Card], int]:
    """Consecutive rows of one image at one path become a card (the table is sorted); (cards, images matched)."""
    import pyarrow as pa

    cols = {name: table[name].to_pylist() for name in COLUMNS if name != "created_at"}
    micros = table["created_at"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()  # never null
    cards: list[Card] = []
    matched = 0
    key: tuple[str, str | None] | None = None
    current: Card | None = None  # None past the limit: the rows are counted, not kept
    for i in range(table.num_rows):
        path = cols["path"][i]
        if (cols["image_id"][i], path) != key:
            key = (cols["image_id"][i], path)
            matched += 1
            current = None
            if limit is None or matched <= limit:
                current = Card(key[0], path, cols["width"][i], cols["height"][i], [], file=image_file(cfg, path))
                cards.append(current)
        if current is None:
            continue
        current.rows.append(
            Row(
                task=cols["task"][i],
                status=cols["status"][i],
                text=cols["text"][i],
                error=cols["error"][i],
                finish_reason=cols["finish_reason"][i],
                tokens_in=cols["tokens_in"][i],
                tokens_out=cols["tokens_out"][i],
                prompt=cols["prompt"][i],
                created_at=_minute(micros[i] // 60_000_000),
                attempts=cols["attempts"][i],
                variant=variant_of(cols["model"][i], cols["quant"][i]),
            )
        )
        if current.width is None and cols["width"][i] is not None:  # an error row has no size; an ok row does
            current.width, current.height = cols["width"][i], cols["height"][i]
    return cards, matched

"""Rows without generation: one generation's text given to every byte-identical item that asked the same.

Both engines generate one request per (image, task, prompt, settings) (`inputs.pending.share_generations`).
When they are done, this writes the rows of the other items, copied from what the run wrote for the one
that generated, and the rows of items whose text an earlier run already made (an ok row of the output).
One place for both engines, so a local and a Ray run write the same rows. A run that dies before this
point leaves those items pending: the next run finds the text in the output and reuses it (ok rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cogbatch.inputs.pending import PendingWork
from cogbatch.job.config import JobConfig
from cogbatch.store import PartWriter
from cogbatch.store.read import rows_of_run
from cogbatch.worker.rows import copied_row


@dataclass
class Shared:
    """What `write_shared_rows` wrote: rows by status, and parts."""

    ok: int = 0
    error: int = 0
    parts: int = 0

    @property
    def rows(self) -> int:
        return self.ok + self.error


def write_shared_rows(cfg: JobConfig, run_id: str, work: PendingWork) -> Shared:
    """The copies of this run's generations (those that got a row) and the reused rows, as parts of the run."""
    shared = Shared()
    if not work.copies and not work.reused:
        return shared
    made = rows_of_run(cfg.output, run_id, set(work.copies))
    rows = [copied_row(made[key], r, run_id) for key, copies in work.copies.items() if key in made for r in copies]
    rows += [copied_row(source, r, run_id) for r, source in work.reused]
    with PartWriter(cfg.output, run_id, flush_rows=cfg.flush_rows, flush_seconds=math.inf) as writer:
        for row in rows:
            writer.add(row)
            shared.ok += row["status"] == "ok"
            shared.error += row["status"] != "ok"
    shared.parts = len(writer.parts_written)
    return shared

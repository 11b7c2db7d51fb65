"""Progress of a job from its output dataset and its input, without loading the model.

Read-only: `status` may be pointed at an output that does not exist yet, that another user's run writes, or
that an older cogbatch wrote (its state is read inside the output); it reads the parts and the hash cache
and writes nothing (not even new hashes). It counts what a run would: one request per item (a file of the
folder, a manifest row) and task, done when its path's current row describes the bytes it holds now.
"""

from __future__ import annotations

from cogbatch.inputs.pending import build_entries, expand_requests
from cogbatch.job.config import JobConfig
from cogbatch.lock import current_holder
from cogbatch.results import StatusReport
from cogbatch.store import current_rows
from cogbatch.store.read import key_table


def job_status(cfg: JobConfig) -> StatusReport:
    """Per task: ok / failed / pending items, rows made with other settings (stale), and a run going on now."""
    dtype = cfg.source.compute_dtype()
    fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in cfg.tasks}
    entries = build_entries(cfg, persist=False)  # read-only: never create the output
    current = current_rows(key_table(cfg.output))
    tasks = {t.name: {"ok": 0, "error": 0, "stale": 0, "pending": 0} for t in cfg.tasks}
    for request in expand_requests(entries, cfg, fingerprints):
        counts = tasks[request.task.name]
        row = current.get(request.key)
        if row is None or row.image_id != request.image.image_id:  # not done, or the file was edited since
            counts["pending"] += 1
        elif row.fingerprint != request.fingerprint:
            counts["stale"] += 1
        else:
            counts[row.status] += 1
    running = current_holder(cfg.output)  # a run holding the output's lock now, or None
    inp = cfg.input
    return StatusReport(str(cfg.output), str(inp.folder or inp.manifest), len({e.path for e in entries}),
                        len({e.image_id for e in entries}), len(current), tasks, running)  # fmt: skip

"""Progress of a job from its output dataset and its input, without loading the model.

Read-only: `status` may be pointed at an output that does not exist yet, or that another user's run
writes; it reads the parts and the hash cache and writes nothing (not even new hashes).
"""

from __future__ import annotations

from cogbatch.inputs.pending import build_entries
from cogbatch.job.config import JobConfig
from cogbatch.lock import current_holder
from cogbatch.results import StatusReport
from cogbatch.store import latest_rows, read_results


def job_status(cfg: JobConfig) -> StatusReport:
    """Per task: ok / failed / pending images, rows made with other settings (stale), and a run going on now."""
    dtype = cfg.source.compute_dtype()
    fingerprints = {t.name: cfg.fingerprint(t, dtype) for t in cfg.tasks}
    ids = {e.image_id for e in build_entries(cfg, persist=False)}  # read-only: never create the output
    newest = latest_rows(read_results(cfg.output, ["image_id", "task", "status", "fingerprint", "created_at"]))
    rows = newest.to_pydict()
    state = {
        (i, t): (s, f)
        for i, t, s, f in zip(rows["image_id"], rows["task"], rows["status"], rows["fingerprint"], strict=True)
    }
    tasks = {}
    for task in cfg.tasks:
        counts = {"ok": 0, "error": 0, "stale": 0, "pending": 0}
        for image_id in ids:
            row = state.get((image_id, task.name))
            if row is None:
                counts["pending"] += 1
            elif row[1] != fingerprints[task.name]:
                counts["stale"] += 1
            else:
                counts[row[0]] += 1
        tasks[task.name] = counts
    running = current_holder(cfg.output)  # a run holding the output's lock now, or None
    return StatusReport(str(cfg.output), len(ids), newest.num_rows, tasks, running)

"""Engines that schedule a job's pending work: the local runner (`cogbatch.runner.run`) and Ray Data.

Every engine computes pending work with `cogbatch.runner.plan_run`, hands chunks of decoded images to
`cogbatch.worker.Worker.process` and writes rows with `cogbatch.store.PartWriter`; only scheduling
differs. Importing this package is cheap: an engine imports its framework only when it runs.
"""

from __future__ import annotations

ENGINES = ("local", "ray")

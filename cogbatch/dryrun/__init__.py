"""The GPU path, executed without a GPU: the project's real code on fake `cuda` tensors, at full size.

    from cogbatch.dryrun import TraceConfig, trace
    report = trace(TraceConfig(model="cogvlm2", capability=(8, 6), dtype="bf16", batch=4, images=4))
    report["peak_reserved_bytes"], report["phases"]["decode"], report.table()

What it runs, what it measures and what it cannot see: docs/dryrun.md. This module imports nothing
heavy; `trace` loads torch and the machinery when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogbatch.dryrun.config import MODELS, TraceConfig, parse_capability, shipped_config

if TYPE_CHECKING:
    from cogbatch.dryrun.report import TraceReport

__all__ = ["MODELS", "TraceConfig", "parse_capability", "shipped_config", "trace"]


def trace(config: TraceConfig) -> TraceReport:
    """Run a dry run (load, worker, optionally generate) and return its report."""
    from cogbatch.dryrun.driver import trace as run

    return run(config)

"""A job: what to run (model, tasks, input, output) with a site's defaults, validated before any work.

    config    JobConfig, TaskConfig, InputConfig: the only shape the rest of the pipeline sees
    load      load_job, with_overrides: a job file (or mapping) merged over pipeline.yaml, validated
    reader    the validation reader: key paths in every message
    pipeline  pipeline.yaml lookup and aliases; ModelSource, where the model and its dtype are resolved
    names     what a `model:` name may be (alias, hub id, path, tiny-random:<arch>), read for every command
"""

from __future__ import annotations

from cogbatch.job.config import InputConfig, JobConfig, TaskConfig
from cogbatch.job.load import load_job, with_overrides

__all__ = ["InputConfig", "JobConfig", "TaskConfig", "load_job", "with_overrides"]

"""cogbatch: run CogVLM-family vision-language models over large image collections."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cogbatch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def run_job(config_or_path, **overrides):
    """Run a job from a notebook or a script and return its summary dict (as `cogbatch run --json`).

    `overrides` are the command-line overrides (`input`, `output`, `limit`, `device`, `batch_size`,
    `vram_ceiling`) plus the run options `redo_changed`, `fail_on_error` and `quiet`.
    """
    from cogbatch.config import JobConfig, load_job
    from cogbatch.runner import RunOptions, run

    options = {k: overrides.pop(k) for k in ("redo_changed", "fail_on_error", "quiet") if k in overrides}
    cfg = config_or_path if isinstance(config_or_path, JobConfig) else load_job(config_or_path, overrides)
    return run(cfg, RunOptions(**options))

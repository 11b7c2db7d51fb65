"""cogbatch: run CogVLM-family vision-language models over large image collections."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cogbatch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def run_job(
    config_or_path,
    *,
    engine: str = "local",
    redo_changed: bool = False,
    retry_errors: bool = False,
    fail_on_error: bool = False,
    quiet: bool = False,
    pipeline=None,
    **overrides,
) -> dict:
    """Run a job from a notebook or a script and return its summary dict (as `cogbatch run --json`).

    `config_or_path`: a job file, a job mapping, or a `JobConfig` from `cogbatch.config.load_job`.
    `overrides` are the command-line overrides, validated like the job's own keys: `input`, `output`,
    `limit`, `device`, `vram_ceiling`, `batch_size`, `workers` (None = not given); any other keyword
    raises TypeError rather than being ignored. `engine="ray"` runs on Ray (`pip install 'cogbatch[ray]'`).
    With the job key `gallery: true` the summary's "gallery" entry says where the refreshed page is.

        cogbatch.run_job("jobs/caption.yaml", input="photos/", limit=10)
    """
    from cogbatch.config import OVERRIDE_KEYS, JobConfig, load_job, with_overrides
    from cogbatch.runner import RunOptions, check_output, run

    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        known = ", ".join(OVERRIDE_KEYS)
        raise TypeError(f"run_job() got unknown override(s) {', '.join(unknown)}; overrides are {known}")
    if engine not in ("local", "ray"):
        raise TypeError(f"run_job() engine must be 'local' or 'ray', got {engine!r}")
    if isinstance(config_or_path, JobConfig):
        if pipeline is not None:
            raise TypeError("run_job() pipeline= applies to a job file, not to a JobConfig (it is already merged)")
        cfg = with_overrides(config_or_path, overrides)
    else:
        cfg = load_job(config_or_path, overrides, pipeline)
    options = RunOptions(
        redo_changed=redo_changed, retry_errors=retry_errors, fail_on_error=fail_on_error, quiet=quiet
    )
    if engine == "ray":
        from cogbatch.engines.ray import run_ray

        check_output(cfg)
        summary = run_ray(cfg, options, workers=cfg.workers)
    else:
        summary = run(cfg, options)
    if cfg.gallery:  # the job key, as `cogbatch run` honours it
        from cogbatch.gallery import refresh_after_run

        summary["gallery"] = refresh_after_run(cfg, summary)
    return summary

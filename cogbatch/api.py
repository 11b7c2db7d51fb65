"""The Python API the CLI and notebooks share: each function validates, calls the library, returns a typed result.

    import cogbatch
    summary = cogbatch.run_job("jobs/caption.yaml", input="photos/", limit=10)
    print(summary.describe()); summary.to_dict()   # what `cogbatch run --json` prints

A job is a job file, a job mapping, or a `JobConfig` (from `cogbatch.job.load_job`); overrides are the
command line's (None = not given), validated like the job's own keys. User mistakes raise `UserError`
subclasses (`cogbatch.errors`), which the CLI turns into one line and exit 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cogbatch.errors import ConfigError, UserError
from cogbatch.job import JobConfig, load_job, with_overrides
from cogbatch.job.config import OVERRIDE_KEYS
from cogbatch.results import CompactReport, ExportReport, PlanReport, QuantizeReport, RunSummary, StatusReport

if TYPE_CHECKING:
    from cogbatch.gallery import GalleryResult

ENGINES = ("local", "ray")


def _job(config_or_path: Any, overrides: dict[str, Any], pipeline: str | Path | None, what: str) -> JobConfig:
    """The job with its overrides; TypeError for a keyword that is no override (a typo must not be dropped)."""
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        known = ", ".join(OVERRIDE_KEYS)
        raise TypeError(f"{what}() got unknown override(s) {', '.join(unknown)}; overrides are {known}")
    if isinstance(config_or_path, JobConfig):
        if pipeline is not None:
            raise TypeError(f"{what}() pipeline= applies to a job file, not to a JobConfig (it is already merged)")
        return with_overrides(config_or_path, overrides)
    return load_job(config_or_path, overrides, pipeline)


def run_job(
    config_or_path: Any,
    *,
    engine: str = "local",
    redo_changed: bool = False,
    retry_errors: bool = False,
    fail_on_error: bool = False,
    quiet: bool = False,
    gallery: bool = False,
    pipeline: str | Path | None = None,
    **overrides: Any,
) -> RunSummary:
    """Run a job and return its summary (as `cogbatch run --json`); `exit_code` says how it ended.

    `overrides`: `input`, `output`, `limit`, `device`, `vram_ceiling`, `batch_size`, `workers`.
    `engine="ray"` runs on Ray (`pip install 'cogbatch[ray]'`). `gallery=True` (or the job key
    `gallery: true`) refreshes the job's gallery afterwards; `summary.gallery` says where it is.

        cogbatch.run_job("jobs/caption.yaml", input="photos/", limit=10)
    """
    from cogbatch.engines.prologue import RunOptions

    if engine not in ENGINES:
        raise TypeError(f"run_job() engine must be 'local' or 'ray', got {engine!r}")
    cfg = _job(config_or_path, overrides, pipeline, "run_job")
    options = RunOptions(redo_changed, retry_errors, fail_on_error, quiet)
    if engine == "ray":
        from cogbatch.engines.ray import run_ray

        summary = run_ray(cfg, options, workers=cfg.workers)  # the extra is checked before the output
    else:
        from cogbatch.engines.local import run_local

        summary = run_local(cfg, options)
    if gallery or cfg.gallery:  # a gallery problem is a warning: the run's exit code stands
        from cogbatch.gallery import refresh_after_run

        summary.gallery = refresh_after_run(cfg, summary)
    return summary


def plan_job(config_or_path: Any, *, pipeline: str | Path | None = None, **overrides: Any) -> PlanReport:
    """Predicted device memory of the job's model and the batch that fits, from config.json alone (no weights).

    `overrides` as `run_job`'s; `vram_ceiling` and `device` (a GPU may be planned for from a laptop) matter.
    """
    from cogbatch.planning.report import plan_report

    return plan_report(_job(config_or_path, overrides, pipeline, "plan_job"))


def job_status(config_or_path: Any, *, pipeline: str | Path | None = None, **overrides: Any) -> StatusReport:
    """Per task: ok / failed / pending images and stale rows; the run holding the output now, if any."""
    from cogbatch.status import job_status as status_of

    return status_of(_job(config_or_path, overrides, pipeline, "job_status"))


def export_job(
    config_or_path: Any,
    fmt: str,
    *,
    task: str | None = None,
    dest: str | Path | None = None,
    overwrite: bool = False,
    stdout: IO[str] | None = None,
    pipeline: str | Path | None = None,
    **overrides: Any,
) -> ExportReport:
    """Export the job's results: `txt` (one caption file per image), `jsonl` or `csv` (to `dest` or `stdout`)."""
    from cogbatch.export import FORMATS, export_rows, export_txt

    if fmt not in FORMATS:
        raise TypeError(f"export_job() fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg = _job(config_or_path, overrides, pipeline, "export_job")
    dest = Path(dest) if dest is not None else None
    if fmt == "txt":
        return export_txt(cfg, task, dest, overwrite)
    return export_rows(cfg, fmt, task, dest, overwrite, stdout)


def compact_output(output: str | Path) -> CompactReport:
    """Merge an output dataset's part files into fewer, without changing its rows (crash-safe)."""
    from cogbatch.store import compact, prepare_output

    try:
        prepare_output(Path(output))
        before, after = compact(Path(output))
    except OSError as e:  # a read-only output (even its .compact.lock), a full disk: rolled back
        raise UserError(f"cannot write {e.filename or output}: {e.strerror or e}") from None
    return CompactReport(str(output), before, after)


def quantize_checkpoint(
    model: str,
    *,
    out: str | Path | None = None,
    quantization: str = "int4",
    rules: tuple[str, ...] | list[str] = (),
    dtype: str = "bf16",
    device: str = "cpu",
    tokenizer: str | None = None,
    pipeline: str | Path | None = None,
    verify: bool = False,
) -> QuantizeReport:
    """Quantize `model` (alias, hub id or local checkpoint) into the quantized-weights cache, ahead of the runs.

    `rules` are `PATTERN=DTYPE` strings (first match wins); the cache is `out`, else $COGBATCH_CACHE_DIR,
    else the pipeline's `cache_dir`. Everything is checked before minutes of quantizing. `verify`: an
    existing entry has every checksum checked (a damaged one is rebuilt); a new entry always is.
    """
    from cogbatch.job.pipeline import BUILTIN_PIPELINE, ModelSource, find_pipeline_file, name_map
    from cogbatch.job.reader import read_quantization, read_yaml

    pipe_path = Path(pipeline) if pipeline else find_pipeline_file(None)
    pipe = {**BUILTIN_PIPELINE, **(read_yaml(pipe_path, "pipeline file") if pipe_path else {})}
    aliases = name_map(pipe, "models", pipe_path, "a hub id or a checkpoint path")
    tokenizers = name_map(pipe, "tokenizers", pipe_path, "a tokenizer's hub id or path")
    parsed = []
    for r in rules:
        pattern, sep, qtype = r.rpartition("=")
        if not sep or not pattern:
            raise ConfigError(f"--rule {r!r}: expected PATTERN=DTYPE, e.g. lm_head=none")
        parsed.append({"pattern": pattern, "dtype": qtype})
    base = read_quantization(quantization, "--quantization")
    if base.default == "none":
        raise ConfigError("--quantization: none has nothing to cache; use int4, int4-g32, int4-g64 or int8")
    spec = read_quantization({"default": base.default, "group_size": base.group_size, "rules": parsed}, "--rule")
    _check_device(device)
    cache = Path(out or os.environ.get("COGBATCH_CACHE_DIR") or pipe.get("cache_dir") or "~/.cache/cogbatch")
    try:  # before minutes of quantizing: the entry is this command's only output
        cache.expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cache directory {cache}: cannot create it ({e.strerror or e})") from None
    if not os.access(cache.expanduser(), os.W_OK | os.X_OK):
        raise ConfigError(f"cache directory {cache}: not writable")
    source = aliases.get(model, model)
    tok = tokenizer or tokenizers.get(source)
    loaded = ModelSource(source, tok, cache.expanduser(), device, dtype, spec).load(
        verify_cache=verify, wait_for_cache=True
    )
    report = loaded.load_report
    written = report.cache_status in ("hit", "written") or report.cache_status.endswith("; rebuilt")  # a damaged one
    if not written:  # writing the entry is this command's only job
        raise UserError(f"the quantized-weights cache was not written under {cache}: {report.cache_status}")
    return QuantizeReport(source, report)


def _check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"--device: must be cpu, cuda or cuda:N (got {device!r})")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}); use cpu")
    if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def gallery_job(
    config_or_path: Any,
    dest: str | Path | None = None,
    *,
    task: str | None = None,
    status: str = "all",
    limit: int | None = None,
    pipeline: str | Path | None = None,
    **overrides: Any,
) -> GalleryResult:
    """Write the job's HTML gallery (default: `<output>.cogbatch/gallery/index.html`) with its thumbnails."""
    from cogbatch.gallery import build_gallery

    return build_gallery(_job(config_or_path, overrides, pipeline, "gallery_job"), dest, task=task, status=status,
                         limit=limit)  # fmt: skip

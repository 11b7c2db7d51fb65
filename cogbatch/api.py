"""The Python API the CLI and notebooks share: each function validates, calls the library, returns a typed result.

    import cogbatch
    summary = cogbatch.run_job("jobs/caption.yaml", input="photos/", limit=10)
    print(summary.describe()); summary.to_dict()   # what `cogbatch run --json` prints

A job is a job file, a job mapping, or a `JobConfig` (from `cogbatch.job.load_job`); overrides are the
command line's (None = not given), validated like the job's own keys. User mistakes raise `UserError`
subclasses (`cogbatch.errors`), which the CLI turns into one line and exit 2.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cogbatch.errors import ConfigError, UserError
from cogbatch.job import JobConfig, load_job, with_overrides
from cogbatch.job.config import OVERRIDE_KEYS
from cogbatch.results import CompactReport, ExportReport, PlanReport, QuantizeReport, RunSummary, StatusReport

if TYPE_CHECKING:
    from cogbatch.compare import CompareReport
    from cogbatch.gallery import GalleryResult

ENGINES = ("local", "ray")


def _job(
    config_or_path: Any,
    overrides: dict[str, Any],
    pipeline: str | Path | None,
    what: str,
    *,
    inputs: bool = True,
    model: str | None = None,
) -> JobConfig:
    """The job with its overrides; TypeError for a keyword that is no override (a typo must not be dropped).

    `inputs=False` leaves the input unread (`plan`); `model` replaces the job file's model (`plan --model`).
    """
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        known = ", ".join(OVERRIDE_KEYS)
        raise TypeError(f"{what}() got unknown override(s) {', '.join(unknown)}; overrides are {known}")
    if isinstance(config_or_path, JobConfig):
        if pipeline is not None:
            raise TypeError(f"{what}() pipeline= applies to a job file, not to a JobConfig (it is already merged)")
        if model is not None:
            raise TypeError(f"{what}() model= applies to a job file or to no job, not to a JobConfig")
        return with_overrides(config_or_path, overrides)
    return load_job(config_or_path, {**overrides, "model": model}, pipeline, inputs=inputs)


def run_job(
    config_or_path: Any,
    *,
    engine: str = "local",
    redo_changed: bool = False,
    retry_errors: bool = False,
    fail_on_error: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    gallery: bool = False,
    pipeline: str | Path | None = None,
    **overrides: Any,
) -> RunSummary:
    """Run a job and return its summary (as `cogbatch run --json`); `exit_code` says how it ended.

    `overrides`: `input`, `output`, `limit`, `device`, `vram_ceiling`, `batch_size`, `workers`.
    `quiet`: no progress or notes on stderr; `verbose`: also the model load's internals and Ray's own
    logs (progress and notes are log records of `cogbatch`: a notebook shows them once logging is set up).
    `engine="ray"` runs on Ray (`pip install 'cogbatch[ray]'`). `gallery=True` (or the job key
    `gallery: true`) refreshes the job's gallery afterwards; `summary.gallery` says where it is.

        cogbatch.run_job("jobs/caption.yaml", input="photos/", limit=10)
    """
    from cogbatch.engines.prologue import RunOptions

    if engine not in ENGINES:
        raise TypeError(f"run_job() engine must be 'local' or 'ray', got {engine!r}")
    cfg = _job(config_or_path, overrides, pipeline, "run_job")
    options = RunOptions(redo_changed, retry_errors, fail_on_error, quiet, verbose)
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


def plan_job(
    config_or_path: Any = None,
    *,
    model: str | None = None,
    gpu: str | None = None,
    vram: str | int | None = None,
    capability: str | None = None,
    pipeline: str | Path | None = None,
    **overrides: Any,
) -> PlanReport:
    """What fits, in which mode and at what batch: from config.json alone, with nothing downloaded or read.

    The job is a job file, a mapping or a JobConfig; or none, with `model=` (an alias, a hub id, a path
    or `tiny-random:<arch>`), planned with pipeline.yaml's defaults. `gpu="RTX 3060 12GB"`, or
    `vram="12GiB"` with `capability="8.6"`, plans for a card this machine need not have, under its
    memory less a reserve for the CUDA context. `overrides` as `run_job`'s; `vram_ceiling` and `device`
    matter (`device="cuda"` plans for a GPU from a laptop).

        cogbatch.plan_job(model="cogvlm2", gpu="RTX 3060 12GB").describe()
    """
    from cogbatch.planning.gpus import plan_target
    from cogbatch.planning.report import plan_report

    target = plan_target(gpu, vram, capability)
    if target is not None and overrides.get("device") == "cpu":
        raise ConfigError("--device cpu: --gpu and --vram plan for a GPU; leave --device out")
    jobless = config_or_path is None
    if jobless:
        if model is None:
            raise TypeError("plan_job() needs a job (a file, a mapping or a JobConfig) or model=")
        config_or_path = {"model": model, "input": {"folder": "."}, "output": ".",
                          "tasks": [{"name": "caption", "prompt": "Describe this image."}]}  # fmt: skip
        model = None
    cfg = _job(config_or_path, overrides, pipeline, "plan_job", inputs=False, model=model)
    ceiling = None
    if target is not None:
        ceiling = target.usable if overrides.get("vram_ceiling") is None else min(target.usable, cfg.vram_ceiling)
    return plan_report(cfg, target, ceiling, jobless)


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
    from cogbatch.fsio import made_dirs
    from cogbatch.job.load import read_pipeline
    from cogbatch.job.names import resolve_model_name
    from cogbatch.job.pipeline import ModelSource, name_map
    from cogbatch.job.reader import read_quantization

    pipe, pipe_path = read_pipeline(pipeline, None)
    aliases = name_map(pipe, "models", pipe_path, "a hub id or a checkpoint path")
    tokenizers = name_map(pipe, "tokenizers", pipe_path, "a tokenizer's hub id or path")
    source = resolve_model_name(model, aliases, pipe_path, None)
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
    tok = tokenizer or tokenizers.get(source)
    with contextlib.ExitStack() as stack:  # a failed load leaves no empty cache folder behind
        try:  # before minutes of quantizing: the entry is this command's only output
            directory = stack.enter_context(made_dirs(cache.expanduser()))
        except OSError as e:
            raise ConfigError(f"cache directory {cache}: cannot create it ({e.strerror or e})") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"cache directory {cache}: not writable")
        loaded = ModelSource(source, tok, directory, device, dtype, spec).load(
            verify_cache=verify, wait_for_cache=True
        )
    report = loaded.load_report
    written = report.cache_status in ("hit", "written") or report.cache_status.endswith("; rebuilt")  # a damaged one
    if not written:  # writing the entry is this command's only job
        raise UserError(f"the quantized-weights cache was not written under {cache}: {report.cache_status}")
    return QuantizeReport(source, report)


def _check_device(device: str, key: str = "--device") -> None:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"{key}: must be cpu, cuda or cuda:N (got {device!r})")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{key} {device}: torch sees no CUDA device here (torch {torch.__version__}); use cpu")
    if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


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


def compare_job(
    config_or_path: Any,
    *,
    sample: int = 16,
    against: Any = "none",
    seed: int = 0,
    per_layer: bool = False,
    pairs: str | Path | None = None,
    against_device: str | None = None,
    topk: int | None = 256,
    pipeline: str | Path | None = None,
    **overrides: Any,
) -> CompareReport:
    """How much the job's quantization changes its answers: `sample` of its images, against `against`.

    Side a (`against`: none = the compute dtype, or int8, int4-g64, ...) and side b (the job's
    quantization) answer every task greedily, one model loaded after the other; the report has exact
    match, token agreement, teacher-forced KL and top-1, chrF and ROUGE-L per task, each side's load
    memory and images/s, and with `per_layer` the layer group whose quantization moves the KL most.
    The pairs go to `pairs` (default `<output>.cogbatch/compare-<time>.parquet`). `topk` reference
    log-probabilities are kept per position (None: all of them, an exact KL).

        report = cogbatch.compare_job("jobs/caption.yaml", sample=20)
        print(report.describe()); report.to_dict()
    """
    from cogbatch.compare import compare

    if against_device is not None:
        _check_device(against_device, "--against-device")
    cfg = _job(config_or_path, overrides, pipeline, "compare_job")
    return compare(cfg, sample=sample, against=against, seed=seed, per_layer=per_layer, pairs=pairs,
                   against_device=against_device, topk=topk)  # fmt: skip

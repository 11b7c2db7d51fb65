"""Loading a job: `pipeline.yaml` defaults merged under a job file (or a mapping), validated before any work.

    cfg = load_job("jobs/caption.yaml", {"limit": 10})      # command-line overrides: None = not given
    cfg = with_overrides(cfg, {"output": "outputs/other"})  # a JobConfig already loaded (a notebook's)

Job keys win over the pipeline file's; keys that nobody reads are unknown, and said to come from the
pipeline file when they do. The model, the output and the cache directory are checked here (a model
alias that names no tiny model, an output that is a file), the manifest's columns too (`inputs.manifest`).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from cogbatch.errors import ConfigError
from cogbatch.inputs.manifest import check_columns
from cogbatch.job.config import (
    DTYPES,
    FOLDER_KEYS,
    JOB_GENERATION,
    MANIFEST_KEYS,
    OVERRIDE_KEYS,
    InputConfig,
    JobConfig,
)
from cogbatch.job.names import TINY_PREFIX, resolve_model_name
from cogbatch.job.pipeline import BUILTIN_PIPELINE, find_pipeline_file, name_map
from cogbatch.job.reader import (
    Section,
    read_generation,
    read_input,
    read_quantization,
    read_task,
    read_yaml,
    size,
)


def load_job(
    job: str | Path | dict[str, Any],
    overrides: dict[str, Any] | None = None,
    pipeline: str | Path | None = None,
    *,
    inputs: bool = True,
) -> JobConfig:
    """Read, merge and validate a job. `overrides` are command-line values (None = not given).

    `inputs=False` leaves the input folder or manifest unchecked (`cogbatch plan` reads no image).
    """
    job_path = None if isinstance(job, dict) else Path(job)
    job_data = dict(job) if isinstance(job, dict) else read_yaml(job_path, "job file")
    pipe_data, pipe_path = read_pipeline(pipeline, job_path)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "input":  # --input PATH: a folder or a Parquet manifest, keeping the job's other input keys
            job_data["input"] = _input_override(Path(v), job_data.get("input"))
        else:
            job_data[k] = v
    return _build(job_data, pipe_data, job_path, pipe_path, inputs)


def read_pipeline(pipeline: str | Path | None, job_path: Path | None) -> tuple[dict[str, Any], Path | None]:
    """The pipeline file's keys over the built-in defaults, and its path (None: no pipeline.yaml found)."""
    pipe_path = Path(pipeline) if pipeline else find_pipeline_file(job_path)
    return {**BUILTIN_PIPELINE, **(read_yaml(pipe_path, "pipeline file") if pipe_path else {})}, pipe_path


def _build(
    job: dict[str, Any], pipe: dict[str, Any], job_path: Path | None, pipe_path: Path | None, inputs: bool = True
) -> JobConfig:
    aliases = name_map(pipe, "models", pipe_path, "a hub id or a checkpoint path")
    tokenizers = name_map(pipe, "tokenizers", pipe_path, "a tokenizer's hub id or path")
    # Job keys win over pipeline defaults; keys of either that nobody reads are unknown.
    merged = {k: v for k, v in pipe.items() if k not in ("models", "tokenizers")}
    merged.update(job)
    sec = Section(merged, "")
    model_name = sec.str_("model")
    if model_name is None:
        raise ConfigError("model: required (an alias from pipeline.yaml, a hub id or a local checkpoint path)")
    model = resolve_model_name(model_name, aliases, pipe_path, job_path)
    tokenizer = sec.str_("tokenizer") or tokenizers.get(model)
    if sec.get("input") is None:
        raise ConfigError("input: required (folder: DIR or manifest: FILE.parquet)")
    base_dir = Path.cwd()
    inp = read_input(sec.get("input"), base_dir, check=inputs)
    output = _output_dir(sec.str_("output"), base_dir)
    gen_sec = Section(sec.get("generation", {}) or {}, "generation")
    defaults = read_generation(gen_sec, JOB_GENERATION)
    gen_sec.finish()
    tasks_data = sec.get("tasks")
    if not isinstance(tasks_data, list) or not tasks_data:
        raise ConfigError("tasks: must be a non-empty list of tasks")
    tasks = tuple(read_task(t, f"tasks[{i}]", defaults) for i, t in enumerate(tasks_data))
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"tasks: the name {dup!r} is used twice")
    configured_cache = sec.str_("cache_dir", "~/.cache/cogbatch")
    from_env = os.environ.get("COGBATCH_CACHE_DIR")
    cache_key = "COGBATCH_CACHE_DIR" if from_env else "cache_dir"
    cache_dir = _cache_dir(Path(from_env or configured_cache).expanduser(), cache_key, model.startswith(TINY_PREFIX))
    cfg = JobConfig(
        path=job_path,
        model=model,
        model_alias=model_name,
        tokenizer=tokenizer,
        input=inp,
        output=output,
        tasks=tasks,
        quantization=read_quantization(sec.get("quantization", "int4")),
        device=_device(sec),
        dtype=sec.str_("dtype", "auto", DTYPES),
        vram_ceiling=size(sec.get("vram_ceiling", "11GiB"), "vram_ceiling"),
        batch_size=sec.int_("batch_size", None),
        limit=sec.int_("limit", None),
        workers=sec.int_("workers", None),
        max_pixels=sec.int_("max_pixels", 178_956_970),
        loader_threads=sec.int_("loader_threads", 4),
        flush_rows=sec.int_("flush_rows", 256),
        flush_seconds=sec.float_("flush_seconds", 30.0, 0.0),
        cache_dir=cache_dir,
        gallery=sec.bool_("gallery", False),
    )
    _finish_top_level(sec, job, pipe_path)
    if inputs:
        check_columns(cfg)
    return cfg


def _finish_top_level(sec: Section, job: dict[str, Any], pipe_path: Path | None) -> None:
    """Unknown keys of the job first; then those that came from the pipeline file, saying so."""
    unknown = sorted(set(sec.data) - sec.used)
    in_job = [k for k in unknown if k in job]
    if in_job:
        raise ConfigError(f"{in_job[0]}: unknown key" + (f" (also: {', '.join(in_job[1:])})" if in_job[1:] else ""))
    if unknown:
        where = f"the pipeline file {pipe_path}" if pipe_path else "the pipeline defaults"
        also = f" (also: {', '.join(unknown[1:])})" if unknown[1:] else ""
        raise ConfigError(f"{unknown[0]}: unknown key in {where}{also}")


def with_overrides(cfg: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """`cfg` with one run's overrides (OVERRIDE_KEYS; None = not given), validated like a job file's keys.

    For a JobConfig already loaded (a notebook's), where `load_job(path, overrides)` cannot be used.
    A key that is not an override raises TypeError: a misspelt keyword must not be silently dropped.
    """
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise TypeError(f"unknown override(s) {', '.join(unknown)}; overrides are {', '.join(OVERRIDE_KEYS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    sec = Section(given, "")
    changes = {k: _override_value(sec, k) for k in given if k != "input"}
    if "input" in given:
        changes["input"] = read_input(_input_override(Path(given["input"]), _input_dict(cfg.input)), Path.cwd())
    new = replace(cfg, **changes)
    if "input" in given:
        check_columns(new)
    return new


def _override_value(sec: Section, name: str) -> Any:
    """One of OVERRIDE_KEYS (not `input`), validated exactly as the job file's own key."""
    if name == "output":
        return _output_dir(sec.str_("output"), Path.cwd())
    if name == "device":
        return _device(sec)
    if name == "vram_ceiling":
        return size(sec.get("vram_ceiling"), "vram_ceiling")
    return sec.int_(name, None)  # limit, batch_size, workers


def _input_override(path: Path, job_input: Any) -> dict[str, Any]:
    """The job's input switched to `path`, keeping the keys that still apply to that kind of input."""
    keep = dict(job_input) if isinstance(job_input, dict) else {}
    if path.is_dir():
        for k in ("manifest", *MANIFEST_KEYS):
            keep.pop(k, None)
        return {**keep, "folder": str(path)}
    if not path.is_file():
        raise ConfigError(f"--input {path}: not a folder or a Parquet file")
    for k in ("folder", *FOLDER_KEYS):
        keep.pop(k, None)
    return {**keep, "manifest": str(path)}


def _input_dict(inp: InputConfig) -> dict[str, Any]:
    """A validated input as the job-file mapping it came from (for overriding it again)."""
    if inp.folder is not None:
        return {"folder": str(inp.folder), "recursive": inp.recursive, "extensions": list(inp.extensions)}
    keys = {k: getattr(inp, k) for k in MANIFEST_KEYS}
    return {"manifest": str(inp.manifest), **{k: v for k, v in keys.items() if v is not None}}


def _output_dir(value: str | None, base_dir: Path) -> Path:
    """The result dataset directory; one that can never be a directory is refused before any work."""
    if value is None:
        raise ConfigError("output: required (the directory of the result dataset)")
    out = base_dir / Path(value).expanduser()
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output: {out} is a file, not a directory (the output is a dataset directory)")
        existing = next(p for p in out.parents if p.exists())
    except OSError as e:
        raise ConfigError(f"output: {out} cannot be used ({e.strerror or e})") from None
    if not existing.is_dir():
        raise ConfigError(f"output: {out} cannot be created: {existing} is a file")
    return out


def _cache_dir(path: Path, key: str, writes: bool) -> Path:
    """The cache directory, refused before any work when it can never be one.

    An existing directory that is read-only is kept (a shared cache can still be read), unless the run
    must write there (`writes`: a tiny random model is built in the cache).
    """
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}: {path} is a file, not a directory")
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:
        raise ConfigError(f"{key}: {path} cannot be used ({e.strerror or e})") from None
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file")
    if (existing != path or writes) and not os.access(existing, os.W_OK | os.X_OK):
        if existing != path:
            raise ConfigError(f"{key}: {path} cannot be created: {existing} is not writable")
        raise ConfigError(f"{key}: {path} is not writable (a tiny random model is built there)")
    return path


def _device(sec: Section) -> str:
    device = sec.str_("device", "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N (got {device!r})")
    return device

"""Job configuration: `pipeline.yaml` defaults merged under a job file, validated before any work.

Every problem is reported with the path of the offending key (`tasks[1].max_new_tokens: must be a
positive integer`) so that a typo in a nightly job fails at once, with exit code 2, instead of
after the model has loaded. The dataclasses here are the only shape the rest of the pipeline sees.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

TEMPLATES = ("base", "chat", "vqa")
QUANT_DTYPES = ("int4", "int8", "none")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# Placeholders every request can use, whatever the input.
BUILTIN_PLACEHOLDERS = ("filename", "stem", "folder")
TINY_PREFIX = "tiny-random:"  # a random model built on the fly (demo / smoke runs)
TINY_ARCHES = ("", "cogvlm", "cogvlm1", "cogvlm2")  # what may follow the prefix ("" = cogvlm2)
# Keys that `cogbatch run` flags and `cogbatch.run_job(..., key=value)` may override for one run.
OVERRIDE_KEYS = ("input", "output", "limit", "device", "vram_ceiling", "batch_size", "workers")
FOLDER_KEYS = ("recursive", "extensions")
MANIFEST_KEYS = ("path_column", "bytes_column", "id_column")

MAX_RETRIES = 16  # generation.retry_on_repetition: each retry is one more whole generation of the request
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64

BUILTIN_PIPELINE: dict[str, Any] = {
    "models": {},
    "tokenizers": {},
    "cache_dir": "~/.cache/cogbatch",
    "device": "auto",
    "dtype": "auto",
    "quantization": "int4",
    "vram_ceiling": "11GiB",
}


class ConfigError(Exception):
    """A configuration problem, with the key path in the message."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    no_repeat_ngram_size: int = 0
    stop_on_repetition: bool = True  # end a looping output early (finish_reason "repetition")
    retry_on_repetition: int = 0  # then try again this many times with sampling


@dataclass(frozen=True)
class TaskConfig:
    name: str
    template: str
    generation: GenerationSettings
    prompt: str | None = None  # a template string with {placeholders}
    question_column: str | None = None  # or: the question comes from this manifest column
    strip_prefixes: tuple[str, ...] = ()

    @property
    def placeholders(self) -> list[str]:
        if self.prompt is None:
            return []
        return [f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None]


@dataclass(frozen=True)
class InputConfig:
    folder: Path | None = None
    recursive: bool = True
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    manifest: Path | None = None
    path_column: str | None = "path"
    bytes_column: str | None = None
    id_column: str | None = None


@dataclass(frozen=True)
class QuantRule:
    pattern: str
    dtype: str  # int4, int4-g32 / -g64 / -g128 (a group size of its own), int8 or none


@dataclass(frozen=True)
class QuantSettings:
    default: str = "int4"
    group_size: int = 128
    rules: tuple[QuantRule, ...] = ()
    embeddings_on_cpu: bool = False
    # Rows above which a quantized layer multiplies by a transient dense weight: None = the device's
    # default (`cogbatch.model.quant_linear.DEFAULT_DEQUANT_THRESHOLD`), math.inf = never, or per
    # device type {cpu: rows, cuda: None (never)}. Placement of work, not weights: not in the cache key.
    dequant_threshold: float | dict[str, float | None] | None = None

    def describe(self) -> str:
        """Short label for result rows: `int4-g128`, `int8`, `none`, with `+rules` when mixed."""
        label = f"int4-g{self.group_size}" if self.default == "int4" else self.default
        return label + ("+rules" if self.rules else "")

    def to_model_arg(self) -> str | dict[str, Any] | None:
        if self.default == "none" and not self.rules:
            return None
        return {
            "default": self.default,
            "group_size": self.group_size,
            "rules": [asdict(r) for r in self.rules],
            "embeddings_on_cpu": self.embeddings_on_cpu,
        }


@dataclass(frozen=True)
class JobConfig:
    path: Path | None
    model: str  # resolved: hub id, local path, or tiny-random:<arch>
    model_alias: str
    tokenizer: str | None
    input: InputConfig
    output: Path
    tasks: tuple[TaskConfig, ...]
    quantization: QuantSettings
    device: str = "auto"
    dtype: str = "auto"
    vram_ceiling: int = 11 * 2**30
    batch_size: int | None = None  # upper bound on sequences decoded together; None: the planner decides
    limit: int | None = None
    workers: int | None = None  # Ray actors (`--engine ray`); None: one per GPU, else 1-2
    max_pixels: int = 178_956_970
    loader_threads: int = 4
    flush_rows: int = 256
    flush_seconds: float = 30.0
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/cogbatch").expanduser())
    gallery: bool = False  # refresh the HTML gallery (`cogbatch gallery`) after each run

    def fingerprint(self, task: TaskConfig, resolved_dtype: str) -> str:
        """Hash of everything that determines a task's text; a change means old rows are stale."""
        what = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "quant": self.quantization.describe(),
            "quant_rules": [asdict(r) for r in self.quantization.rules],
            "dtype": resolved_dtype,
            "template": task.template,
            "prompt": task.prompt if task.prompt is not None else f"column:{task.question_column}",
            "generation": asdict(task.generation),
            "strip_prefixes": list(task.strip_prefixes),
        }
        if self.quantization.dequant_threshold is not None:
            # Dense vs fused int4 differ within rounding, which can flip a greedy token. Only an explicit
            # setting enters the hash, so rows made with the device's default keep their fingerprint.
            what["dequant_threshold"] = self.quantization.dequant_threshold
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint_fields(self, task: TaskConfig) -> dict[str, Any]:
        """The settings behind a fingerprint, for naming what changed between two runs."""
        return {
            "model": self.model,
            "quantization": self.quantization.describe(),
            "template": task.template,
            "prompt": task.prompt or f"column:{task.question_column}",
            **asdict(task.generation),
            "strip_prefixes": list(task.strip_prefixes),
        }

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, as written to `config.resolved.yaml` beside the output."""

        def plain(x: Any) -> Any:
            if isinstance(x, Path):
                return str(x)
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [plain(v) for v in x]
            return x

        return plain(asdict(self))


# -- parsing helpers -----------------------------------------------------------------------------


class _Section:
    """A mapping being consumed key by key, so that leftovers can be reported as unknown keys."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'job'}: must be a mapping of keys to values")
        self.data, self.path, self.used = data, path, set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        return self.data.get(name, default)

    def has(self, name: str) -> bool:
        return name in self.data

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.key(unknown[0])}: unknown key" + (f" (also: {', '.join(unknown[1:])})" if unknown[1:] else "")
            )

    def str_(self, name: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.get(name, default)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{self.key(name)}: must be a non-empty string")
        if choices and v not in choices:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(choices)} (got {v!r})")
        return v

    def bool_(self, name: str, default: bool) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.key(name)}: must be true or false")
        return v

    def int_(self, name: str, default: int | None, minimum: int = 1, maximum: int | None = None) -> int | None:
        v = self.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
            if maximum is not None:
                kind = f"an integer from {minimum} to {maximum}"
            else:
                kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{self.key(name)}: must be {kind}")
        return v

    def float_(self, name: str, default: float, low: float, high: float | None = None, low_open=True) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{self.key(name)}: must be a finite number (got {v!r})")
        too_low = v <= low if low_open else v < low
        if too_low or (high is not None and v > high):
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise ConfigError(f"{self.key(name)}: must be {bounds}")
        return float(v)

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.get(name, list(default))
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise ConfigError(f"{self.key(name)}: must be a list of strings")
        return tuple(v)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any, key: str) -> int:
    """`11GiB`, `10.5GB`, `512MiB` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key}: must be a size such as 11GiB or 10GB (got {value!r})")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def _generation(sec: _Section, base: GenerationSettings) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=sec.int_("max_new_tokens", base.max_new_tokens),
        do_sample=sec.bool_("do_sample", base.do_sample),
        temperature=sec.float_("temperature", base.temperature, 0.0),
        top_p=sec.float_("top_p", base.top_p, 0.0, 1.0),
        top_k=sec.int_("top_k", base.top_k, minimum=0),
        repetition_penalty=sec.float_("repetition_penalty", base.repetition_penalty, 0.0),
        seed=sec.int_("seed", base.seed, minimum=0, maximum=SEED_LIMIT - 1),
        no_repeat_ngram_size=sec.int_("no_repeat_ngram_size", base.no_repeat_ngram_size, minimum=0),
        stop_on_repetition=sec.bool_("stop_on_repetition", base.stop_on_repetition),
        retry_on_repetition=sec.int_("retry_on_repetition", base.retry_on_repetition, minimum=0, maximum=MAX_RETRIES),
    )


def _task(data: Any, path: str, defaults: GenerationSettings) -> TaskConfig:
    sec = _Section(data, path)
    name = sec.str_("name")
    if name is None:
        raise ConfigError(f"{sec.key('name')}: required")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{sec.key('name')}: use letters, digits, '_', '-' or '.' only (got {name!r})")
    prompt = sec.get("prompt")
    question_column = sec.str_("question_column")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ConfigError(f"{sec.key('prompt')}: must be a non-empty string")
    if (prompt is None) == (question_column is None):
        raise ConfigError(f"{path}: give exactly one of prompt or question_column")
    template = sec.str_("template", "chat", TEMPLATES)
    generation = _generation(sec, defaults)
    strip = sec.str_list("strip_prefixes", ())
    sec.finish()
    task = TaskConfig(name, template, generation, prompt, question_column, strip)
    try:
        task.placeholders  # noqa: B018 (parses the format string)
    except ValueError as e:
        msg = f"{sec.key('prompt')}: invalid placeholder syntax ({e}); write {{{{ and }}}} for literal braces"
        raise ConfigError(msg) from None
    return task


def _input(data: Any, base_dir: Path) -> InputConfig:
    sec = _Section(data, "input")
    folder, manifest = sec.str_("folder"), sec.str_("manifest")
    if (folder is None) == (manifest is None):
        raise ConfigError("input: give exactly one of folder or manifest")
    misplaced = [k for k in (MANIFEST_KEYS if manifest is None else FOLDER_KEYS) if sec.has(k)]
    if misplaced:  # e.g. `recursive: false` under a manifest would silently do nothing
        kind, other = ("folder", "manifest") if manifest is None else ("manifest", "folder")
        raise ConfigError(f"input.{misplaced[0]}: applies to a {other} input only (this input is a {kind})")
    exts = tuple(e.lower().lstrip(".") for e in sec.str_list("extensions", DEFAULT_EXTENSIONS))
    cfg = InputConfig(
        folder=(base_dir / Path(folder).expanduser()) if folder else None,
        recursive=sec.bool_("recursive", True),
        extensions=exts,
        manifest=(base_dir / Path(manifest).expanduser()) if manifest else None,
        path_column=sec.str_("path_column", "path" if manifest and not sec.has("bytes_column") else None),
        bytes_column=sec.str_("bytes_column"),
        id_column=sec.str_("id_column"),
    )
    sec.finish()
    if cfg.folder is not None:
        if not cfg.folder.is_dir():
            raise ConfigError(f"input.folder: {cfg.folder} is not a directory")
    else:
        if cfg.manifest.is_dir():
            raise ConfigError(f"input.manifest: {cfg.manifest} is a directory (a manifest is one Parquet file)")
        if not cfg.manifest.is_file():
            raise ConfigError(f"input.manifest: {cfg.manifest} does not exist")
        if (cfg.path_column is None) == (cfg.bytes_column is None):
            raise ConfigError("input: a manifest needs exactly one of path_column or bytes_column")
    return cfg


_QUANT_RE = re.compile(r"(int4)(?:-g(\d+))?|int8|none")
_DEQUANT_DEVICES = ("cpu", "cuda")


def _quant_dtype(value: Any, key: str) -> tuple[str, int | None]:
    """("int4", 64) for "int4-g64", ("int8", None) for "int8"; ConfigError naming `key` otherwise."""
    m = _QUANT_RE.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key}: must be one of int4, int8, none (int4 with a group size: int4-g32, int4-g64, "
                          f"int4-g128) (got {value!r})")  # fmt: skip
    group = int(m.group(2)) if m.group(2) else None
    if group is not None and group not in (32, 64, 128):
        raise ConfigError(f"{key}: group size must be 32, 64 or 128")
    return ("int4" if m.group(1) else value), group


def _quant_rule(data: Any, key: str) -> QuantRule:
    """{pattern, dtype[, group_size]}; the group size is folded into the dtype (`int4-g64`)."""
    rs = _Section(data, key)
    pattern, raw = rs.str_("pattern"), rs.get("dtype")
    if pattern is None or raw is None:
        raise ConfigError(f"{rs.path}: needs both pattern and dtype")
    dtype, group = _quant_dtype(raw, rs.key("dtype"))
    if rs.has("group_size"):
        if dtype != "int4":
            raise ConfigError(f"{rs.key('group_size')}: only int4 rules take a group size")
        given = rs.int_("group_size", None)
        if given not in (32, 64, 128) or (group is not None and group != given):
            raise ConfigError(f"{rs.key('group_size')}: must be 32, 64 or 128 (and agree with the dtype)")
        group = given
    rs.finish()
    return QuantRule(pattern, f"int4-g{group}" if group is not None else dtype)


def _dequant_threshold(sec: _Section) -> float | dict[str, float | None] | None:
    """Absent: the device default; null: never; rows >= 0; or {cpu: rows | null, cuda: rows | null}."""
    name = "dequant_threshold"
    if not sec.has(name):
        return None
    value = sec.get(name)
    if value is None:
        return math.inf
    if isinstance(value, dict):
        per_device = _Section(value, sec.key(name))
        out = {d: per_device.int_(d, None, minimum=0) for d in _DEQUANT_DEVICES if per_device.has(d)}
        per_device.finish()
        return out
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{sec.key(name)}: must be a row count >= 0, null (never) or a mapping of cpu/cuda to one")
    return value


def _quantization(value: Any, key: str = "quantization") -> QuantSettings:
    if isinstance(value, str):
        if not _QUANT_RE.fullmatch(value):
            raise ConfigError(f"{key}: must be int4, int4-g32, int4-g64, int4-g128, int8, none or a mapping")
        dtype, group = _quant_dtype(value, key)
        return QuantSettings(default=dtype, group_size=group or 128)
    sec = _Section(value, key)
    default = sec.str_("default", "int4", QUANT_DTYPES)
    group = sec.int_("group_size", 128)
    if group not in (32, 64, 128):
        raise ConfigError(f"{sec.key('group_size')}: must be 32, 64 or 128")
    rules_data = sec.get("rules", [])
    if not isinstance(rules_data, list):
        raise ConfigError(f"{sec.key('rules')}: must be a list of {{pattern, dtype}} mappings")
    rules = tuple(_quant_rule(r, f"{sec.key('rules')}[{i}]") for i, r in enumerate(rules_data))
    cpu_embed = sec.bool_("embeddings_on_cpu", False)
    threshold = _dequant_threshold(sec)
    sec.finish()
    return QuantSettings(default, group, rules, cpu_embed, threshold)


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


def _resolve_model(name: str, aliases: dict[str, str]) -> str:
    model = aliases.get(name, name)
    if model.startswith(TINY_PREFIX) and model[len(TINY_PREFIX) :] not in TINY_ARCHES:
        raise ConfigError(
            f"model: {model!r} is not a tiny random model (use tiny-random:cogvlm or tiny-random:cogvlm2)"
        )
    return model


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


def _name_map(pipe: dict[str, Any], name: str, pipe_path: Path | None, what: str) -> dict[str, str]:
    """`models:` / `tokenizers:` of the pipeline file: names to non-empty strings."""
    where = f" (in {pipe_path})" if pipe_path else ""
    value = pipe.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"pipeline.{name}: must be a mapping of names to strings{where}")
    for k, v in value.items():
        if not isinstance(k, str) or not k.strip():
            raise ConfigError(f"pipeline.{name}: the name {k!r} must be a non-empty string{where}")
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"pipeline.{name}.{k}: must be a non-empty string ({what}), got {v!r}{where}")
    return value


def _device(sec: _Section) -> str:
    device = sec.str_("device", "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N (got {device!r})")
    return device


def _override_value(sec: _Section, name: str) -> Any:
    """One of OVERRIDE_KEYS (not `input`), validated exactly as the job file's own key."""
    if name == "output":
        return _output_dir(sec.str_("output"), Path.cwd())
    if name == "device":
        return _device(sec)
    if name == "vram_ceiling":
        return parse_size(sec.get("vram_ceiling"), "vram_ceiling")
    return sec.int_(name, None)  # limit, batch_size, workers


def with_overrides(cfg: JobConfig, overrides: dict[str, Any]) -> JobConfig:
    """`cfg` with one run's overrides (OVERRIDE_KEYS; None = not given), validated like a job file's keys.

    For a JobConfig already loaded (a notebook's), where `load_job(path, overrides)` cannot be used.
    A key that is not an override raises TypeError: a misspelt keyword must not be silently dropped.
    """
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise TypeError(f"unknown override(s) {', '.join(unknown)}; overrides are {', '.join(OVERRIDE_KEYS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    sec = _Section(given, "")
    changes = {k: _override_value(sec, k) for k in given if k != "input"}
    if "input" in given:
        changes["input"] = _input(_input_override(Path(given["input"]), _input_dict(cfg.input)), Path.cwd())
    new = replace(cfg, **changes)
    if "input" in given:
        _check_placeholders(new)
    return new


# -- loading -------------------------------------------------------------------------------------


def find_pipeline_file(job_path: Path | None) -> Path | None:
    """`pipeline.yaml` in the current directory, else beside the job file or in one of its parents."""
    candidates = [Path.cwd() / "pipeline.yaml"]
    if job_path is not None:
        candidates += [d / "pipeline.yaml" for d in job_path.resolve().parents]
    return next((c for c in candidates if c.is_file()), None)


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")  # never the locale's encoding: a job file reads the same everywhere
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except ValueError as e:  # a scalar YAML resolves but Python refuses: `2024-13-01`, an integer of 5000 digits
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: must be a mapping of keys to values")
    return data


def load_job(
    job: str | Path | dict[str, Any],
    overrides: dict[str, Any] | None = None,
    pipeline: str | Path | None = None,
) -> JobConfig:
    """Read, merge and validate a job. `overrides` are command-line values (None = not given)."""
    job_path = None if isinstance(job, dict) else Path(job)
    job_data = dict(job) if isinstance(job, dict) else read_yaml(job_path, "job file")
    pipe_path = Path(pipeline) if pipeline else find_pipeline_file(job_path)
    pipe_data = {**BUILTIN_PIPELINE, **(read_yaml(pipe_path, "pipeline file") if pipe_path else {})}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "input":  # --input PATH: a folder or a Parquet manifest, keeping the job's other input keys
            job_data["input"] = _input_override(Path(v), job_data.get("input"))
        else:
            job_data[k] = v
    return _build(job_data, pipe_data, job_path, pipe_path)


def _build(job: dict[str, Any], pipe: dict[str, Any], job_path: Path | None, pipe_path: Path | None) -> JobConfig:
    aliases = _name_map(pipe, "models", pipe_path, "a hub id or a checkpoint path")
    tokenizers = _name_map(pipe, "tokenizers", pipe_path, "a tokenizer's hub id or path")
    # Job keys win over pipeline defaults; keys of either that nobody reads are unknown.
    merged = {k: v for k, v in pipe.items() if k not in ("models", "tokenizers")}
    merged.update(job)
    sec = _Section(merged, "")
    model_name = sec.str_("model")
    if model_name is None:
        raise ConfigError("model: required (an alias from pipeline.yaml, a hub id or a local checkpoint path)")
    model = _resolve_model(model_name, aliases)
    tokenizer = sec.str_("tokenizer") or tokenizers.get(model)
    if sec.get("input") is None:
        raise ConfigError("input: required (folder: DIR or manifest: FILE.parquet)")
    base_dir = Path.cwd()
    inp = _input(sec.get("input"), base_dir)
    output = _output_dir(sec.str_("output"), base_dir)
    gen_sec = _Section(sec.get("generation", {}) or {}, "generation")
    defaults = _generation(gen_sec, GenerationSettings())
    gen_sec.finish()
    tasks_data = sec.get("tasks")
    if not isinstance(tasks_data, list) or not tasks_data:
        raise ConfigError("tasks: must be a non-empty list of tasks")
    tasks = tuple(_task(t, f"tasks[{i}]", defaults) for i, t in enumerate(tasks_data))
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
        quantization=_quantization(sec.get("quantization", "int4")),
        device=_device(sec),
        dtype=sec.str_("dtype", "auto", DTYPES),
        vram_ceiling=parse_size(sec.get("vram_ceiling", "11GiB"), "vram_ceiling"),
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
    _check_placeholders(cfg)
    return cfg


def _finish_top_level(sec: _Section, job: dict[str, Any], pipe_path: Path | None) -> None:
    """Unknown keys of the job first; then those that came from the pipeline file, saying so."""
    unknown = sorted(set(sec.data) - sec.used)
    in_job = [k for k in unknown if k in job]
    if in_job:
        raise ConfigError(f"{in_job[0]}: unknown key" + (f" (also: {', '.join(in_job[1:])})" if in_job[1:] else ""))
    if unknown:
        where = f"the pipeline file {pipe_path}" if pipe_path else "the pipeline defaults"
        also = f" (also: {', '.join(unknown[1:])})" if unknown[1:] else ""
        raise ConfigError(f"{unknown[0]}: unknown key in {where}{also}")


def manifest_schema(inp: InputConfig) -> Any:
    """The pyarrow schema of a Parquet manifest, read from its footer only (None for a folder input)."""
    if inp.manifest is None:
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(inp.manifest)
    except Exception as e:  # not Parquet, truncated, unreadable
        raise ConfigError(f"input.manifest: {inp.manifest} is not a readable Parquet file ({e})") from None


def manifest_columns(inp: InputConfig) -> list[str]:
    """Column names of a Parquet manifest, read from its footer only."""
    schema = manifest_schema(inp)
    return [] if schema is None else list(schema.names)


def _sample_value(arrow_type: Any) -> Any:
    """A value of a column's type to try a prompt's format specs on; None when the type has no simple sample."""
    import pyarrow as pa

    if pa.types.is_boolean(arrow_type):
        return False
    if pa.types.is_integer(arrow_type):
        return 0
    if pa.types.is_floating(arrow_type):
        return 0.0
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "x"
    return None


def _check_format_specs(prompt: str, key: str, samples: dict[str, Any]) -> None:
    """`{n:d}` on a string column, `{filename:.2f}`: a config error now rather than a failure per row."""
    for _, name, spec, conversion in string.Formatter().parse(prompt):
        if name is None or samples.get(name) is None:
            continue
        piece = "{0" + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        try:
            piece.format(samples[name])
        except (ValueError, TypeError, KeyError, IndexError) as e:
            kind = type(samples[name]).__name__
            raise ConfigError(f"{key}: {{{name}:{spec}}} cannot format the {kind} values of {name!r} ({e})") from None


def _check_column_types(inp: InputConfig, schema: Any) -> None:
    """A bytes column of strings, or a path column of numbers, would make every row an error row."""
    import pyarrow as pa

    def kind(col: str) -> Any:
        t = schema.field(col).type
        return t.value_type if pa.types.is_dictionary(t) else t

    if inp.bytes_column is not None:
        t = kind(inp.bytes_column)
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)):
            raise ConfigError(f"input.bytes_column: column {inp.bytes_column!r} holds {t}, not image bytes (binary)")
    elif inp.path_column is not None:
        t = kind(inp.path_column)
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise ConfigError(f"input.path_column: column {inp.path_column!r} holds {t}, not paths (strings)")


def _check_placeholders(cfg: JobConfig) -> None:
    schema = manifest_schema(cfg.input)
    columns = [] if schema is None else list(schema.names)
    for col_key in ("path_column", "bytes_column", "id_column"):
        col = getattr(cfg.input, col_key)
        if col is not None and cfg.input.manifest is not None and col not in columns:
            raise ConfigError(f"input.{col_key}: the manifest has no column {col!r} (columns: {', '.join(columns)})")
    if schema is not None:
        _check_column_types(cfg.input, schema)
    known = set(BUILTIN_PLACEHOLDERS) | set(columns)
    for i, task in enumerate(cfg.tasks):
        if task.question_column is not None:
            if cfg.input.manifest is None:
                raise ConfigError(f"tasks[{i}].question_column: needs a Parquet manifest input")
            if task.question_column not in columns:
                raise ConfigError(f"tasks[{i}].question_column: the manifest has no column {task.question_column!r}")
        for ph in task.placeholders:
            if ph not in known:
                raise ConfigError(
                    f"tasks[{i}].prompt: unknown placeholder {{{ph}}} (known: {', '.join(sorted(known))})"
                )
        if task.prompt is not None:
            samples = dict.fromkeys(BUILTIN_PLACEHOLDERS, "x")
            if schema is not None:
                samples.update({f.name: _sample_value(f.type) for f in schema})
            _check_format_specs(task.prompt, f"tasks[{i}].prompt", samples)

"""The job reader: a mapping consumed key by key, so that every value is checked and every leftover named.

Every problem is reported with the path of the offending key (`tasks[1].max_new_tokens: must be a
positive integer`) so that a typo in a nightly job fails at once, with exit code 2, instead of after the
model has loaded. Hand-written rather than a schema library: `docs/design.md` has the measurements.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from cogbatch.errors import ConfigError
from cogbatch.job.config import (
    DEFAULT_EXTENSIONS,
    FOLDER_KEYS,
    MANIFEST_KEYS,
    MAX_RETRIES,
    TEMPLATES,
    InputConfig,
    TaskConfig,
)
from cogbatch.model.quant.spec import (
    DEQUANT_DEVICES,
    KV_CACHE_DTYPES,
    QDTYPES,
    QuantConfig,
    QuantRule,
    split_kv_suffix,
    split_qtype,
)
from cogbatch.model.settings import SEED_LIMIT, GenerationConfig, parse_size


class Section:
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


def size(value: Any, key: str) -> int:
    """`11GiB`, `10.5GB`, `512MiB` or a plain number of bytes."""
    try:
        return parse_size(value)
    except ValueError:
        raise ConfigError(f"{key}: must be a size such as 11GiB or 10GB (got {value!r})") from None


def read_generation(sec: Section, base: GenerationConfig) -> GenerationConfig:
    return GenerationConfig(
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


def read_task(data: Any, path: str, defaults: GenerationConfig) -> TaskConfig:
    sec = Section(data, path)
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
    generation = read_generation(sec, defaults)
    strip = sec.str_list("strip_prefixes", ())
    sec.finish()
    task = TaskConfig(name, template, generation, prompt, question_column, strip)
    try:
        task.placeholders  # noqa: B018 (parses the format string)
    except ValueError as e:
        msg = f"{sec.key('prompt')}: invalid placeholder syntax ({e}); write {{{{ and }}}} for literal braces"
        raise ConfigError(msg) from None
    return task


def read_input(data: Any, base_dir: Path, check: bool = True) -> InputConfig:
    """The `input:` section; `check=False` leaves the folder or manifest unread (`cogbatch plan`)."""
    sec = Section(data, "input")
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
    if cfg.manifest is not None and (cfg.path_column is None) == (cfg.bytes_column is None):
        raise ConfigError("input: a manifest needs exactly one of path_column or bytes_column")
    if not check:
        return cfg
    if cfg.folder is not None and not cfg.folder.is_dir():
        raise ConfigError(f"input.folder: {cfg.folder} is not a directory")
    if cfg.manifest is not None:
        if cfg.manifest.is_dir():
            raise ConfigError(f"input.manifest: {cfg.manifest} is a directory (a manifest is one Parquet file)")
        if not cfg.manifest.is_file():
            raise ConfigError(f"input.manifest: {cfg.manifest} does not exist")
    return cfg


def _quant_dtype(value: Any, key: str) -> tuple[str, int | None]:
    """("int4", 64) for "int4-g64", ("int8", None) for "int8"; ConfigError naming `key` otherwise."""
    split = split_qtype(value)
    if split is None:
        raise ConfigError(f"{key}: must be one of int4, int8, none (int4 with a group size: int4-g32, int4-g64, "
                          f"int4-g128) (got {value!r})")  # fmt: skip
    if split[1] is not None and split[1] not in (32, 64, 128):
        raise ConfigError(f"{key}: group size must be 32, 64 or 128")
    return split


def _quant_rule(data: Any, key: str) -> QuantRule:
    """{pattern, dtype[, group_size]}; the group size is folded into the dtype (`int4-g64`)."""
    rs = Section(data, key)
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
    return QuantRule(pattern, dtype, group)


def _dequant_threshold(sec: Section) -> float | dict[str, float | None] | None:
    """Absent: the device default; null: never; rows >= 0; or {cpu: rows | null, cuda: rows | null}."""
    name = "dequant_threshold"
    if not sec.has(name):
        return None
    value = sec.get(name)
    if value is None:
        return math.inf
    if isinstance(value, dict):
        per_device = Section(value, sec.key(name))
        out = {d: per_device.int_(d, None, minimum=0) for d in DEQUANT_DEVICES if per_device.has(d)}
        per_device.finish()
        return out
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{sec.key(name)}: must be a row count >= 0, null (never) or a mapping of cpu/cuda to one")
    return value


def read_quantization(value: Any, key: str = "quantization") -> QuantConfig:
    """A job's `quantization:` (or `compare --against`): a weight dtype, optionally `+kv8`, or a mapping."""
    if isinstance(value, str):
        weights, kv_cache = split_kv_suffix(value)
        if split_qtype(weights) is None:
            raise ConfigError(f"{key}: must be int4, int4-g32, int4-g64, int4-g128, int8, none (each optionally "
                              f"with +kv8: an 8-bit KV cache) or a mapping")  # fmt: skip
        dtype, group = _quant_dtype(weights, key)
        return QuantConfig(default=dtype, group_size=group or 128, kv_cache=kv_cache)
    sec = Section(value, key)
    default = sec.str_("default", "int4", QDTYPES)
    group = sec.int_("group_size", 128)
    if group not in (32, 64, 128):
        raise ConfigError(f"{sec.key('group_size')}: must be 32, 64 or 128")
    rules_data = sec.get("rules", [])
    if not isinstance(rules_data, list):
        raise ConfigError(f"{sec.key('rules')}: must be a list of {{pattern, dtype}} mappings")
    rules = tuple(_quant_rule(r, f"{sec.key('rules')}[{i}]") for i, r in enumerate(rules_data))
    cpu_embed = sec.get("embeddings_on_cpu", "auto")
    if cpu_embed == "auto":
        cpu_embed = None  # the worker decides (`planning.report._embeddings_choice`)
    elif not isinstance(cpu_embed, bool):
        raise ConfigError(f"{sec.key('embeddings_on_cpu')}: must be true, false or auto")
    threshold = _dequant_threshold(sec)
    kv_cache = sec.str_("kv_cache", "none", KV_CACHE_DTYPES)
    sec.finish()
    return QuantConfig(default, group, rules, cpu_embed, threshold, kv_cache)


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

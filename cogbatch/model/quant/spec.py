"""What to quantize: one `QuantConfig`, read from a job's `quantization:` or given to `CogVLM.from_pretrained`.

Torch-free, so that the job reader builds it (with messages naming the job's keys) before anything heavy
is imported, and the loader, the planner and the cache key all use the very object the job holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

from cogbatch.model.errors import ConfigError

QDTYPES = ("int4", "int8", "none")
GROUP_SIZES = (32, 64, 128)
QTYPE_PATTERN = re.compile(r"(int4)(?:-g(\d+))?|int8|none")  # `int4-g64`: int4 with a group size of its own
DEQUANT_DEVICES = ("cpu", "cuda")  # the device types `dequant_threshold` may name
KV_CACHE_DTYPES = ("none", "int8")  # how generation stores keys and values: "none" = the model's dtype

# Rows above which a quantized layer multiplies by a transient dense weight: None = the device's default
# (`cogbatch.model.quant.linear.DEFAULT_DEQUANT_THRESHOLD`), math.inf = never, or per device type.
DequantThreshold = float | dict[str, float | None] | None


def split_qtype(value: Any) -> tuple[str, int | None] | None:
    """("int4", 64) for "int4-g64", ("int8", None) for "int8", None when `value` names no quantized dtype."""
    m = QTYPE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return None
    return ("int4", int(m.group(2)) if m.group(2) else None) if m.group(1) else (value, None)


def split_kv_suffix(value: str) -> tuple[str, str]:
    """("int4", "int8") for "int4+kv8", ("int4", "none") for "int4": the short spelling of an 8-bit KV cache."""
    if value.endswith("+kv8"):
        return value.removesuffix("+kv8"), "int8"
    return value, "none"


@dataclass(frozen=True)
class QuantRule:
    """Module names matching `pattern` (fnmatch glob) get `dtype`; `group_size` overrides the default for int4."""

    pattern: str
    dtype: str  # int4, int8 or none
    group_size: int | None = None

    def label(self) -> str:
        """`int4-g64` for an int4 rule with a group size of its own, else the dtype (as a job file writes it)."""
        return f"int4-g{self.group_size}" if self.dtype == "int4" and self.group_size else self.dtype


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize: a default for every Linear, rules (first match wins), and placement options.

    Only `nn.Linear` layers are ever quantized: embeddings, norms and convolutions keep the compute
    dtype whatever the rules say. `embeddings_on_cpu` keeps the token embedding table in host memory
    (CogVLM2's is 1 GB in bf16; None = "auto": the pipeline decides, see `planning.report._embeddings_choice`; a
    plain load keeps it on the device) and `dequant_threshold` decides where a layer's work runs;
    both place work, not weights, so neither is part of the cache key. `kv_cache: int8` stores
    generation's keys and values in 8 bits: it changes outputs (so it is part of a run's settings) but
    no weight (so it is not part of the cache key either), and it applies with unquantized weights too.
    """

    default: str = "int4"
    group_size: int = 128
    rules: tuple[QuantRule, ...] = ()
    embeddings_on_cpu: bool | None = None
    dequant_threshold: DequantThreshold = None
    kv_cache: str = "none"

    def __post_init__(self) -> None:
        _check_dtype(self.default, "quantization.default")
        if self.kv_cache not in KV_CACHE_DTYPES:
            raise ConfigError(f"quantization.kv_cache: {self.kv_cache!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        _check_group(self.group_size, "quantization.group_size")
        for i, r in enumerate(self.rules):
            _check_dtype(r.dtype, f"quantization.rules[{i}].dtype")
            if r.group_size is not None:
                _check_group(r.group_size, f"quantization.rules[{i}].group_size")

    @classmethod
    def parse(cls, spec: Any) -> QuantConfig | None:
        """The weights' quantization: None for none; accepts None/"none", "int4", "int4-g32", "int8", a dict
        or a QuantConfig.

        The lenient reader of the Python API (case and spaces ignored); job files go through the job
        reader, whose messages name the job's keys.
        """
        full = cls.read(spec)
        return None if full is None else full.effective()

    @classmethod
    def read(cls, spec: Any) -> QuantConfig | None:
        """As `parse`, but the whole config, `kv_cache` included, even when it quantizes no weight."""
        if spec is None or isinstance(spec, QuantConfig):
            return spec
        if isinstance(spec, str):
            weights, kv_cache = split_kv_suffix(spec.strip().lower())
            dtype, group = _parse_dtype(weights, "quantization")
            if dtype == "none" and kv_cache == "none":
                return None
            return cls(default=dtype, group_size=group or 128, kv_cache=kv_cache)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"quantization: expected a string, a mapping or None, got {type(spec).__name__}")
        unknown = set(spec) - {"default", "group_size", "rules", "embeddings_on_cpu", "kv_cache"}
        if unknown:
            raise ConfigError(f"quantization: unknown key(s) {', '.join(sorted(unknown))}")
        default, group = _parse_dtype(spec.get("default", "int4"), "quantization.default")
        if "group_size" in spec:
            group = spec["group_size"]
        raw_rules = spec.get("rules") or []
        if not isinstance(raw_rules, (list, tuple)):
            raise ConfigError("quantization.rules: expected a list of {pattern, dtype} mappings")
        rules = tuple(_parse_rule(r, f"quantization.rules[{i}]") for i, r in enumerate(raw_rules))
        embeddings_on_cpu = spec.get("embeddings_on_cpu")
        if embeddings_on_cpu == "auto":
            embeddings_on_cpu = None
        if not isinstance(embeddings_on_cpu, bool | None):
            raise ConfigError("quantization.embeddings_on_cpu: expected true, false or auto")
        kv_cache = str(spec.get("kv_cache", "none")).strip().lower()
        return cls(default, int(group or 128), rules, embeddings_on_cpu, kv_cache=kv_cache)

    def effective(self) -> QuantConfig | None:
        """This config, or None when a load with it quantizes nothing (and places nothing on the host).

        About the weights only: `kv_cache` is read from the whole config (`read`), never from this.
        """
        if self.default == "none" and not self.rules:
            return None
        if self.default == "none" and all(r.dtype == "none" for r in self.rules) and not self.embeddings_on_cpu:
            return None
        return self

    def resolve(self, module_name: str) -> tuple[str, int | None]:
        """(dtype, requested int4 group size) of one Linear: the first matching rule, else the default."""
        for r in self.rules:
            if fnmatchcase(module_name, r.pattern):
                return r.dtype, (r.group_size or self.group_size) if r.dtype == "int4" else None
        return self.default, self.group_size if self.default == "int4" else None

    def to_dict(self) -> dict[str, Any]:
        """The weights' settings, the embeddings' placement and the KV cache (the cache sidecar, the load report)."""
        return {
            "default": self.default,
            "group_size": self.group_size,
            "rules": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rules],
            "embeddings_on_cpu": self.embeddings_on_cpu,
            "kv_cache": self.kv_cache,
        }

    def key_dict(self) -> dict[str, Any]:
        """The part of the config that decides the weights (the cache key hashes it)."""
        d = self.to_dict()
        del d["embeddings_on_cpu"], d["kv_cache"]
        return d

    def job_dict(self) -> dict[str, Any]:
        """As a job file writes it (rules with `int4-gN` dtypes): `config.resolved.yaml`, run fingerprints."""
        return {
            "default": self.default,
            "group_size": self.group_size,
            "rules": self.rule_labels(),
            "embeddings_on_cpu": "auto" if self.embeddings_on_cpu is None else self.embeddings_on_cpu,
            "dequant_threshold": self.dequant_threshold,
            "kv_cache": self.kv_cache,
        }

    def rule_labels(self) -> list[dict[str, str]]:
        return [{"pattern": r.pattern, "dtype": r.label()} for r in self.rules]

    def label(self) -> str:
        """Short label for result rows and logs: `int4-g128`, `int8`, `none`, with `+rules` when mixed and
        `+kv8` with an 8-bit KV cache."""
        base = f"int4-g{self.group_size}" if self.default == "int4" else self.default
        return base + ("+rules" if self.rules else "") + ("+kv8" if self.kv_cache == "int8" else "")


def _check_dtype(value: str, key: str) -> None:
    if value not in QDTYPES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(QDTYPES)}")


def _check_group(value: Any, key: str) -> None:
    if value not in GROUP_SIZES or isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, GROUP_SIZES))}")


def _parse_dtype(value: Any, key: str) -> tuple[str, int | None]:
    """Split "int4-g64" into ("int4", 64) and "int8" into ("int8", None), case and spaces ignored."""
    split = split_qtype(str(value).strip().lower())
    if split is None:
        raise ConfigError(f"{key}: {value!r} must be one of int4, int4-g32, int4-g64, int4-g128, int8, none")
    if split[1] is not None:
        _check_group(split[1], key)
    return split


def _parse_rule(r: Any, key: str) -> QuantRule:
    if isinstance(r, QuantRule):
        return r
    if not isinstance(r, Mapping) or "pattern" not in r or "dtype" not in r:
        raise ConfigError(f"{key}: expected a mapping with pattern and dtype")
    extra = set(r) - {"pattern", "dtype", "group_size"}
    if extra:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(sorted(extra))}")
    dtype, group = _parse_dtype(r["dtype"], f"{key}.dtype")
    return QuantRule(str(r["pattern"]), dtype, r.get("group_size", group))

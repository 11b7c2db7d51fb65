"""A job's settings as the rest of the pipeline sees them: `JobConfig`, `TaskConfig`, `InputConfig`.

Built only by `cogbatch.job.load` (pipeline.yaml defaults merged under a job file, validated before any
work); frozen, so a run, its history line and its fingerprints all see the same settings. The model's own
settings classes (`GenerationConfig`, `QuantConfig`) are used as they are: no second copy to convert.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogbatch.inputs.entries import BUILTIN_PLACEHOLDERS
from cogbatch.job.pipeline import ModelSource
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.model.settings import DTYPE_NAMES, GenerationConfig

__all__ = ["BUILTIN_PLACEHOLDERS", "InputConfig", "JobConfig", "TaskConfig"]

TEMPLATES = ("base", "chat", "vqa")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", *DTYPE_NAMES)
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# Keys that `cogbatch run` flags and `cogbatch.run_job(..., key=value)` may override for one run.
OVERRIDE_KEYS = ("input", "output", "limit", "device", "vram_ceiling", "batch_size", "workers")
FOLDER_KEYS = ("recursive", "extensions")
MANIFEST_KEYS = ("path_column", "bytes_column", "id_column")

MAX_RETRIES = 16  # generation.retry_on_repetition: each retry is one more whole generation of the request
# A job's generation defaults: the model's, except that a looping output ends early (finish_reason "repetition").
JOB_GENERATION = GenerationConfig(stop_on_repetition=True)


@dataclass(frozen=True)
class TaskConfig:
    name: str
    template: str
    generation: GenerationConfig
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
class JobConfig:
    path: Path | None
    model: str  # resolved: hub id, local path, or tiny-random:<arch>
    model_alias: str
    tokenizer: str | None
    input: InputConfig
    output: Path
    tasks: tuple[TaskConfig, ...]
    quantization: QuantConfig
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

    @property
    def source(self) -> ModelSource:
        """Where the model comes from and how it runs (device, compute dtype, quantization), resolved in one place."""
        return ModelSource(self.model, self.tokenizer, self.cache_dir, self.device, self.dtype, self.quantization)

    def fingerprint(self, task: TaskConfig, resolved_dtype: str) -> str:
        """Hash of everything that determines a task's text; a change means old rows are stale."""
        what = {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "quant": self.quantization.label(),
            "quant_rules": self.quantization.rule_labels(),
            "dtype": resolved_dtype,
            "template": task.template,
            "prompt": task.prompt if task.prompt is not None else f"column:{task.question_column}",
            "generation": task.generation.job_dict(),
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
            "quantization": self.quantization.label(),
            "template": task.template,
            "prompt": task.prompt or f"column:{task.question_column}",
            **task.generation.job_dict(),
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

        d = asdict(self)
        d["quantization"] = self.quantization.job_dict()  # rules as a job file writes them (`int4-g64`)
        for task, out in zip(self.tasks, d["tasks"], strict=True):
            out["generation"] = task.generation.job_dict()
        return plain(d)

"""`pipeline.yaml` and the model source: the one place a job's model, device and compute dtype are resolved.

`pipeline.yaml` holds a site's defaults (device, dtype, quantization, cache_dir) and names for models and
tokenizers (`models: {cogvlm2: THUDM/cogvlm2-llama3-chat-19B}`); it is found in the current directory,
else beside the job file or above it. `ModelSource` is what every user of the model asks (the local and
Ray engines, the worker, `cogbatch plan`, `cogbatch status`, `cogbatch quantize`), so a run's fingerprint
names the dtype that its model then computes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cogbatch.errors import ConfigError
from cogbatch.job.names import TINY_PREFIX, tiny_checkpoint
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.model.settings import DTYPE_NAMES

BUILTIN_PIPELINE: dict[str, Any] = {
    "models": {},
    "tokenizers": {},
    "cache_dir": "~/.cache/cogbatch",
    "device": "auto",
    "dtype": "auto",
    "quantization": "int4",
    "vram_ceiling": "11GiB",
}


def find_pipeline_file(job_path: Path | None) -> Path | None:
    """`pipeline.yaml` in the current directory, else beside the job file or in one of its parents."""
    candidates = [Path.cwd() / "pipeline.yaml"]
    if job_path is not None:
        candidates += [d / "pipeline.yaml" for d in job_path.resolve().parents]
    return next((c for c in candidates if c.is_file()), None)


def name_map(pipe: dict[str, Any], name: str, pipe_path: Path | None, what: str) -> dict[str, str]:
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


@dataclass(frozen=True)
class ModelSource:
    """Where a job's model comes from and how it runs: the one place the model source and compute dtype are resolved.

    `model` is a hub id, a local checkpoint or `tiny-random:<arch>` (a random model built once in the
    cache). Reading its `config.json` (`config`) needs no weights; a hub id fetches that file only.
    """

    model: str
    tokenizer: str | None
    cache_dir: Path
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto or one of DTYPE_NAMES
    quantization: QuantConfig | None = None

    @property
    def is_tiny(self) -> bool:
        return self.model.startswith(TINY_PREFIX)

    @property
    def quantized(self) -> QuantConfig | None:
        """The quantization a load applies, or None when it quantizes nothing."""
        return None if self.quantization is None else self.quantization.effective()

    def tiny_dir(self) -> Path:
        """Build (once) the random model that `tiny-random:<arch>` names; its text is meaningless."""
        return tiny_checkpoint(self.model, self.cache_dir)

    def config(self) -> Any:
        """The model's `CogVLMConfig` from its config.json alone; ConfigError naming the model when it cannot work."""
        from cogbatch.model.config import CogVLMConfig
        from cogbatch.model.weights import resolve_checkpoint

        source = self.tiny_dir() if self.is_tiny else resolve_checkpoint(self.model, ("config.json",))
        try:
            return CogVLMConfig.from_json(source)
        except ConfigError as e:
            raise ConfigError(f"model: {self.model}: {e}") from None

    def torch_device(self) -> Any:
        """The torch device a run uses: `auto` is the GPU when torch sees one, else the CPU."""
        import torch

        if self.device != "auto":
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def compute_dtype(self) -> str:
        """The compute dtype a run will use (`bfloat16`...), without loading the model: it enters the fingerprint."""
        import torch

        from cogbatch.model.cogvlm import resolve_dtype

        device = self.torch_device()
        if self.dtype == "auto" and device.type == "cpu" and self.quantized is not None:
            return "bfloat16"  # quantized on CPU: bf16 is what gets the fused int4 kernel (TinyGemm)
        if device.type == "cuda" and not torch.cuda.is_available():  # planning for a GPU from a machine without one
            return DTYPE_NAMES.get(self.dtype, "bfloat16")  # what `auto` picks on an Ampere or newer GPU
        return str(resolve_dtype(self.dtype, device)).removeprefix("torch.")

    def load(
        self, use_cache: bool = True, progress: Callable[[str, int, int], None] | None = None, **options: Any
    ) -> Any:
        """The `CogVLM`, loaded with these settings (quantized through the cache under `cache_dir`).

        `use_cache=False` quantizes without reading or writing the cache: a one-off load (`compare
        --per-layer`) must not leave gigabytes of entries no run will read. `progress(what, bytes done,
        bytes total)` is called as the weights are read (see `from_pretrained`). `options` go to
        `CogVLM.from_pretrained` (`verify_cache`, `wait_for_cache`,
        `park_vision` for phase-swapped runs).
        """
        from cogbatch.model.cogvlm import CogVLM

        return CogVLM.from_pretrained(
            self.tiny_dir() if self.is_tiny else self.model,
            dtype=self.compute_dtype(),
            device=None if self.device == "auto" else self.device,
            quantization=self.quantization,  # the whole config: `kv_cache` too
            tokenizer=self.tokenizer,
            cache_dir=self.cache_dir if use_cache else False,
            dequant_threshold=None if self.quantization is None else self.quantization.dequant_threshold,
            progress=progress,
            **options,
        )

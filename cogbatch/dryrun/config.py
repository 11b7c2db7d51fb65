"""What a dry run runs (`TraceConfig`) and the shipped model configs it can run them on.

No torch here: `cogbatch plan` and the script parse options before anything heavy is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from cogbatch.model.quant.spec import KV_CACHE_DTYPES

GiB = 2**30
# Short names of the shipped configs (package data `cogbatch/model/configs/<hub name>/config.json`).
MODELS = {"cogvlm2": "cogvlm2-llama3-chat-19B", "cogvlm": "cogvlm-chat-hf"}
DTYPES = ("bf16", "fp16", "fp32")
MODES = ("auto", "swap", "resident")
DEFAULT_PROMPT = "Describe this image in detail: the main objects and their colours."


class DryRunError(ValueError):
    """Settings that the job or the model refuse (a user mistake, found before any tracing)."""


def shipped_config(model: str) -> dict[str, Any]:
    """The real `config.json` of a supported checkpoint, by short name (cogvlm, cogvlm2) or hub name."""
    name = MODELS.get(model, model.rpartition("/")[2])
    if name not in MODELS.values():
        raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    return json.loads(resources.files("cogbatch.model").joinpath("configs", name, "config.json").read_text())


def small_config(model: str) -> dict[str, Any]:
    """A shipped config with small sizes and the real structure: generation, GQA ratio, vocabulary, token ids.

    Hidden sizes stay multiples of 128 (TinyGemm's group) and of the kernels' tiles, heads keep the real
    head dim (128), two layers each; CogVLM2 keeps grouped KV heads (2:1 here, 4:1 real) and its
    128256-token vocabulary (the Llama-3 special tokens need their ids), so its lm_head is the largest
    weight, as in the real model.
    """
    d = shipped_config(model)
    v2 = "num_multi_query_heads" in d
    d.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
    if v2:
        d["num_multi_query_heads"] = 1
    image_size = 112 if v2 else 56  # grid 8 (even, for CogVLM2's 2x2 convolution) / 4
    d["vision_config"] = {**d["vision_config"], "hidden_size": 128, "intermediate_size": 256, "num_heads": 1,
                          "num_hidden_layers": 2, "image_size": image_size,
                          "num_positions": (image_size // 14) ** 2 + 1}  # fmt: skip
    return d


@dataclass(frozen=True)
class TraceConfig:
    """One dry run: the model, the device it pretends to be, the job's settings, and what to run.

    `quantization` takes what a job's `quantization:` key takes (int4, int4-g64, int8, none, or a dict
    with rules); `embeddings_on_cpu` and `kv_cache` (none, int8) are merged into it. `card_bytes` is the
    card's memory: the allocator model may use `card_bytes - context_bytes` (the CUDA context and library
    workspaces live outside it) and the job's `vram_ceiling` defaults to the card. `tasks` prompts are asked about
    each of `images` images; `batch` is the job's `batch_size` (at most that many decode slots).
    """

    model: str = "cogvlm2"
    config: dict[str, Any] | None = None  # a config.json dict instead of a shipped one (small shapes for tests)
    capability: tuple[int, int] = (8, 6)
    dtype: str = "bf16"
    quantization: Any = "int4"
    embeddings_on_cpu: bool | None = None  # None: the job's default (auto: host memory when the run swaps)
    kv_cache: str = "none"  # int8: an 8-bit KV cache
    batch: int = 4
    images: int = 4
    tasks: int = 1
    new_tokens: int = 256
    prompt: str = DEFAULT_PROMPT
    card_bytes: int = 11 * GiB
    context_bytes: int = int(0.4 * GiB)
    vram_ceiling: int | None = None
    mode: str = "auto"  # auto: what the planner picks; swap / resident: forced
    expandable_segments: bool = False
    generate: bool = False  # also plain `model.generate` of `batch` images, every weight resident
    worker: bool = True
    api: bool = False  # load and worker through `cogbatch.load` and `VLM.generate`
    raise_oom: bool = False  # an allocation past the card raises torch.OutOfMemoryError (else it is counted)
    strict_kernels: bool = True  # a failed CUDA kernel check raises (else it is counted)
    trace_every_layer: bool = False  # trace the loader on every Linear, not one per distinct shape
    # Every request makes 2 new tokens, one from its prompt prefill and one decode step, while the decoder
    # still plans and allocates its cache for `new_tokens`: minutes less per run, for grids of runs
    # (`scripts/bench_planner.py`); the later steps' working memory, which grows with the keys seen, is not traced.
    short_decode: bool = False
    # The card's memory becomes the worker's planned peak once the plan is made (after the load): a card
    # exactly as large as the planner asked for, so its allocator runs under the pressure of a real fit
    # (releasing cached segments; `oom_events` counts what still would not fit). For planner grids.
    card_from_plan: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.config is None and self.model not in MODELS:
            problems.append(f"model must be one of {', '.join(MODELS)} (got {self.model!r})")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.kv_cache not in KV_CACHE_DTYPES:
            problems.append(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)} (got {self.kv_cache!r})")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        for name in ("batch", "images", "tasks", "new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer (got {getattr(self, name)!r})")
        if not (isinstance(self.capability, tuple) and len(self.capability) == 2):
            problems.append(f"capability must be (major, minor) (got {self.capability!r})")
        if self.api and self.mode != "auto":
            problems.append("api runs the planner's mode (cogbatch.load has no mode to force): mode must be auto")
        if self.api and not self.worker:
            problems.append("api traces VLM.generate: it needs the worker part")
        if self.card_bytes <= self.context_bytes:
            problems.append("the card must be larger than the context reserve")
        if problems:
            raise ValueError("; ".join(problems))

    def config_dict(self) -> dict[str, Any]:
        return dict(self.config) if self.config is not None else shipped_config(self.model)

    @property
    def ceiling(self) -> int:
        return self.vram_ceiling if self.vram_ceiling is not None else self.card_bytes

    def job_quantization(self) -> Any:
        """The job's `quantization:` value, with `embeddings_on_cpu` (when set) and `kv_cache` merged in."""
        q = self.quantization
        extra: dict[str, Any] = {} if self.embeddings_on_cpu is None else {"embeddings_on_cpu": self.embeddings_on_cpu}
        if self.kv_cache != "none":
            extra["kv_cache"] = self.kv_cache
        if isinstance(q, dict):
            return {**q, **extra}
        if q in (None, "none"):
            if self.embeddings_on_cpu:
                raise ValueError("embeddings_on_cpu needs a quantized model")
            extra.pop("embeddings_on_cpu", None)
            q = "none"
        if not extra:
            return q
        default, _, group = str(q).partition("-g")
        return {"default": default, **({"group_size": int(group)} if group else {}), **extra}


def parse_capability(text: str) -> tuple[int, int]:
    """`8.6` -> (8, 6)."""
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        raise ValueError(f"capability must look like 8.6 (got {text!r})") from None

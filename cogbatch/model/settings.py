"""Settings both sides of the torch boundary share: generation settings, dtype names, sizes.

Torch-free, so that the job reader validates a job with these very classes before torch is imported,
and the model uses what the job holds without a converter in between.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64

# The one dtype table: every spelling a job, the API or a script accepts -> torch's name.
DTYPE_NAMES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}


def torch_dtype(name: str) -> Any:
    """The torch dtype of one of DTYPE_NAMES' spellings (KeyError for another)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode one request; a job's `generation:` and each task's keys are read into this.

    Decoding is deterministic per request whatever it is batched with (the seed is per sequence).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids; (): never stop early
    no_repeat_ngram_size: int = 0  # > 0: never repeat an n-gram of the prompt text or the output
    stop_on_repetition: bool = False  # stop a sequence whose tail loops (finish reason "repetition")
    retry_on_repetition: int = 0  # the pipeline then tries again this many times, sampling (the decoder ignores it)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be a positive integer")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0")
        if self.retry_on_repetition < 0:
            raise ValueError("retry_on_repetition must be >= 0")

    def job_dict(self) -> dict[str, Any]:
        """The settings a job file can set (everything but `stop_token_ids`): what run fingerprints hash."""
        d = asdict(self)
        del d["stop_token_ids"]
        return d


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
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


def parse_size(size: int | str) -> int:
    """Bytes from 123, "11GiB", "512 MiB" or "200MB" (KB/MB/GB are decimal, as Hugging Face's shard sizes).

    ValueError for anything else, or for less than one byte; callers name their key in their own message.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if m is None:
            raise ValueError(f"cannot read a size from {size!r}: use bytes or e.g. '11GiB', '200MB', '1GB'")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if value < 1:
        raise ValueError(f"a size must be at least 1 byte, got {size!r}")
    return value

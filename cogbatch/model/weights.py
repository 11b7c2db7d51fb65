"""Checkpoint resolution and weight streaming: safetensors only, tensor by tensor.

A checkpoint is a local directory or a hub id in the official layout (`config.json`, sharded
`model-*.safetensors` with `model.safetensors.index.json`, tokenizer files). Nothing in it is
executed: pickled `.bin` weights are refused, the `auto_map` remote code is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cogbatch.model.errors import CheckpointError

# Files worth fetching from the hub: configs, weights, tokenizer. Never `*.py`, never `*.bin`.
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken")
# For a tokenizer-only repo (vicuna for cogvlm-chat-hf): never its multi-GB weights.
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "config.json", "*.tiktoken")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Buffers the reference stores but we recompute (rotary frequencies): checked for shape, not loaded.
DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def resolve_checkpoint(
    path_or_id: str | Path, patterns: tuple[str, ...] = HUB_PATTERNS, cache_dir: Path | None = None
) -> Path:
    """A local checkpoint directory, downloading a hub id once if it is not cached yet.

    A name with a registered scheme (`tiny-random:cogvlm2`, `model.sources`) is made by its resolver,
    under `cache_dir` when given. `HF_HUB_OFFLINE=1` is honoured by huggingface_hub: an uncached hub id
    is then an error.
    """
    from cogbatch.model.sources import resolve_scheme

    made = resolve_scheme(str(path_or_id), cache_dir)
    if made is not None:
        return made
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with config.json and *.safetensors")
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such checkpoint directory (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns)))
    except HFValidationError as e:
        raise CheckpointError(f"{name}: not a valid hub id ({e})") from None
    except Exception as e:  # offline mode, no network, gated or missing repo: all the same to the user
        raise CheckpointError(
            f"{name}: not a local directory and it could not be fetched from the hub "
            f"({type(e).__name__}: {e}). Download it once with network access, or give a local path."
        ) from None


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, in index order."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = [ckpt / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{ckpt}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    single = ckpt / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in ckpt.glob("*.bin")) + sorted(p.name for p in ckpt.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{ckpt} has only pickled weights ({', '.join(pickles[:3])}). cogbatch reads safetensors only, "
            "because unpickling a checkpoint can execute code; convert it once with safetensors' "
            "`save_file(torch.load(f, weights_only=True), ...)` in a trusted environment."
        )
    raise CheckpointError(f"{ckpt}: no model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def scan_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes from the shard headers, without reading any tensor data."""
    found: dict[str, TensorInfo] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                sl = h.get_slice(name)
                found[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
    return found


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, TensorInfo], ckpt: Path) -> None:
    """Refuse a checkpoint whose names or shapes differ from the architecture, listing every difference."""

    def listing(names: list[str]) -> str:
        shown = ", ".join(names[:8])
        return shown + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")

    problems = []
    missing = [n for n in expected if n not in found and not n.endswith(DERIVED_SUFFIXES)]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} {found[n].shape} != {s}" for n, s in expected.items() if n in found and found[n].shape != s]
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong)}")
    if problems:
        raise CheckpointError(f"{ckpt} does not match its config.json: " + "; ".join(problems))


def stream_tensors(files: list[Path], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, read straight from the shard onto `device`."""
    for f in files:
        with safe_open(f, framework="pt", device=str(device)) as h:
            for name in h.keys():  # noqa: SIM118
                yield name, h.get_tensor(name)


def has_tokenizer(ckpt: Path) -> bool:
    return any((ckpt / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(source: str | Path):
    """A tokenizer through `AutoTokenizer`, never running checkpoint code.

    The official configs carry an `auto_map` for remote code; `trust_remote_code=False` keeps
    transformers from offering to run it. `fix_mistral_regex=False` silences a heuristic that
    mistakes pre-5.0 configs without `model_type` for Mistral's.
    """
    from transformers import AutoTokenizer

    path = resolve_checkpoint(source, TOKENIZER_PATTERNS)
    if not has_tokenizer(path):
        raise CheckpointError(f"{path} has no tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, fix_mistral_regex=False)

"""Tiny random CogVLM / CogVLM2 checkpoints in the official Hugging Face layout.

Tests and benchmarks need checkpoints that go through exactly the code path of the real ones
(`config.json` with the real keys, sharded safetensors with `model.safetensors.index.json`, a
tokenizer that `AutoTokenizer` loads) without downloading 35 GB. This module writes such a
checkpoint from a handful of sizes, deterministically:

* weights are drawn as the golden harness drew them (`tests/data/golden/README.md`, "Weights"): one
  seeded `torch.Generator`, tensors visited in sorted name order, so that the golden `dev` shapes
  with the golden seed reproduce the golden `dev` weights bit for bit. Shards are filled in that
  same order and flushed as soon as the next tensor would overflow them, so memory stays at about
  one shard plus one tensor even for a 0.5B-parameter model; the index lists the tensors in the
  reference state_dict order (`checkpoint_tensor_shapes`).
* the tokenizer is trained with `tokenizers` on a small built-in English corpus (`testing.tokenizer`):
  a vicuna-like byte-fallback BPE for CogVLM, a Llama-3-like byte-level BPE for CogVLM2.

Same arguments and seed give byte-identical files.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cogbatch.fsio import atomic_write, publish, temp_path
from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.settings import DTYPE_NAMES, parse_size, torch_dtype
from cogbatch.testing.tokenizer import LLAMA3_FIRST_SPECIAL_ID, LLAMA3_VOCAB_SIZE, build_tokenizer

ARCHS = {"cogvlm": "cogvlm1", "cogvlm1": "cogvlm1", "cogvlm2": "cogvlm2"}

# Real configs: the reference code was written for this version; keeping it also keeps every
# version-dependent heuristic of transformers behaving as it does on the real checkpoints.
_TRANSFORMERS_VERSION = "4.40.2"
_AUTO_MAP = {
    "AutoConfig": "configuration_cogvlm.CogVLMConfig",
    "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
}
_RANDN_CHUNK = 1 << 22  # elements drawn per torch.randn call; must stay a multiple of 16 (see _random_tensor)


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    shard_size: int | str = "200MB",
    seed: int = 0,
    overwrite: bool = False,
    **shape: Any,
) -> Path:
    """Write a random checkpoint in the official layout to `out_dir` and return its path.

    `shape`: the sizes `tiny_config` takes (arch, hidden_size, layers, heads, kv_heads, ...). Defaults,
    per `arch` ("cogvlm"/"cogvlm1" or "cogvlm2"):
      heads: hidden_size // 16 (head_dim 16) below 512, hidden_size // 128 from 512 up, as real
        Llama-family models use head_dim 128; the same rule gives vision_heads.
      kv_heads: heads for cogvlm1 (multi-head attention), max(1, heads // 2) for cogvlm2.
      intermediate sizes: 2 x hidden (LM) and 2 x vision hidden.
      image_size: 56 (cogvlm1, grid 4) / 112 (cogvlm2, grid 8: even, for the 2x2 convolution).
      vocab_size: 512 (cogvlm1) / 128256 (cogvlm2, the Llama-3 special tokens need their real ids).
    `shard_size` is bytes or a string such as "200MB" (decimal units, as Hugging Face) or "64MiB".

    Everything is validated (`ValueError` naming the bad size) before anything is written. The
    directory must be empty or absent unless `overwrite`; `config.json` is written last, so a
    directory with a config is a complete checkpoint.
    """
    _, dtype_name = _resolve_dtype(dtype)
    config = tiny_config(**shape, torch_dtype=dtype_name)
    return write_checkpoint(out_dir, config, dtype=dtype, shard_size=shard_size, seed=seed, overwrite=overwrite)


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    dtype: str = "fp32",
    shard_size: int | str = "200MB",
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """A random checkpoint of any `config.json` dict (tiny, or a real model's shapes) in the official layout.

    `device`: where the weights are drawn. On a GPU drawing is nearly free (torch's CPU sampler draws
    ~125 M normals per CPU-second: a 19 B model would take minutes), and each shard is written by a
    background thread while the next one is drawn; the values then differ from a CPU draw of the same seed.
    Validated before anything is written, like `write_tiny_checkpoint`.
    """
    torch_dtype, _ = _resolve_dtype(dtype)
    max_shard_bytes = parse_size(shard_size)
    cfg = CogVLMConfig.from_dict(config)  # raises ConfigError (a ValueError) on inconsistent sizes
    tokenizer, tokenizer_config, special_tokens = build_tokenizer(cfg)  # may reject vocab_size, still nothing written

    out = _prepare_out_dir(Path(out_dir), overwrite)
    write_weights(out, cfg, dtype=torch_dtype, max_shard_bytes=max_shard_bytes, seed=seed, device=device)
    atomic_write(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_tokens)
    _write_json(out / "config.json", config)
    return out


# --------------------------------------------------------------------------------------------
# config.json


def tiny_config(
    *,
    arch: str = "cogvlm1",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int | None = None,
    vision_intermediate_size: int | None = None,
    image_size: int | None = None,
    patch_size: int = 14,
    vocab_size: int | None = None,
    torch_dtype: str = "float32",
    rms_norm_eps: float = 1e-5,
    vision_layer_norm_eps: float = 1e-6,
) -> dict[str, Any]:
    """The `config.json` dict: the real configs' keys, in their order, with tiny numbers."""
    generation = ARCHS.get(arch)
    if generation is None:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    v2 = generation == "cogvlm2"
    for name, value in (
        ("hidden_size", hidden_size),
        ("layers", layers),
        ("vision_hidden_size", vision_hidden_size),
        ("vision_layers", vision_layers),
        ("patch_size", patch_size),
    ):
        _check_positive(name, value)
    heads = _default_heads(hidden_size, "hidden_size") if heads is None else heads
    vision_heads = _default_heads(vision_hidden_size, "vision_hidden_size") if vision_heads is None else vision_heads
    if kv_heads is None:
        kv_heads = max(1, heads // 2) if v2 else heads
    if not v2 and kv_heads != heads:
        raise ValueError(
            "cogvlm1 uses multi-head attention (its config has no num_multi_query_heads): "
            f"kv_heads={kv_heads} must equal heads={heads}"
        )
    intermediate_size = 2 * hidden_size if intermediate_size is None else intermediate_size
    vision_intermediate_size = 2 * vision_hidden_size if vision_intermediate_size is None else vision_intermediate_size
    image_size = (112 if v2 else 56) if image_size is None else image_size
    vocab_size = (LLAMA3_VOCAB_SIZE if v2 else 512) if vocab_size is None else vocab_size
    for name, value in (
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("intermediate_size", intermediate_size),
        ("vision_heads", vision_heads),
        ("vision_intermediate_size", vision_intermediate_size),
        ("image_size", image_size),
        ("vocab_size", vocab_size),
    ):
        _check_positive(name, value)
    if hidden_size % heads == 0 and (hidden_size // heads) % 2:
        raise ValueError(f"head_dim = hidden_size/heads = {hidden_size // heads} must be even (rotary embedding)")
    if v2 and vocab_size < LLAMA3_VOCAB_SIZE:
        raise ValueError(
            f"cogvlm2 needs vocab_size >= {LLAMA3_VOCAB_SIZE}: the Llama-3 special tokens live at ids "
            f"{LLAMA3_FIRST_SPECIAL_ID}..{LLAMA3_VOCAB_SIZE - 1} (got {vocab_size})"
        )

    config: dict[str, Any] = {
        "architectures": ["CogVLMForCausalLM"],
        "auto_map": dict(_AUTO_MAP),
        "bos_token_id": 128000 if v2 else 1,
        "eos_token_id": [128001, 128009] if v2 else 2,
        "pad_token_id": 128002 if v2 else 0,  # also the image placeholder id
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 8192 if v2 else 2048,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
    }
    if v2:
        config["num_multi_query_heads"] = kv_heads  # its presence is what marks a CogVLM2 config
    config.update(
        {
            "rms_norm_eps": rms_norm_eps,
            "template_version": "chat",
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "transformers_version": _TRANSFORMERS_VERSION,
            "use_cache": True,
            "vision_config": {
                "dropout_prob": 0.0,
                "hidden_act": "gelu",
                "hidden_size": vision_hidden_size,
                "image_size": image_size,
                "in_channels": 3,
                "intermediate_size": vision_intermediate_size,
                "layer_norm_eps": vision_layer_norm_eps,
                "num_heads": vision_heads,
                "num_hidden_layers": vision_layers,
                "num_positions": (image_size // patch_size) ** 2 + 1,  # patches + cls
                "patch_size": patch_size,
            },
            "vocab_size": vocab_size,
        }
    )
    return config


def _default_heads(hidden_size: int, what: str) -> int:
    """head_dim 16 keeps tiny models tiny; from 512 up, head_dim 128 as in the real models."""
    head_dim = 128 if hidden_size >= 512 else 16
    if hidden_size % head_dim:
        raise ValueError(
            f"{what}={hidden_size} is not a multiple of the default head_dim {head_dim}: pass the number of heads"
        )
    return hidden_size // head_dim


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _resolve_dtype(dtype: str) -> tuple[torch.dtype, str]:
    try:
        return torch_dtype(dtype), DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected fp32, fp16 or bf16") from None


# --------------------------------------------------------------------------------------------
# weights


def write_weights(
    out: Path, cfg: CogVLMConfig, *, dtype: torch.dtype, max_shard_bytes: int, seed: int, device: str = "cpu"
) -> None:
    """Draw and write the shards one at a time, then the index; never all weights in memory.

    On the CPU a shard is written before the next is drawn (memory: about one shard plus one tensor);
    on a GPU one shard is written by a background thread while the next is drawn.
    """
    shapes = checkpoint_tensor_shapes(cfg)
    itemsize = dtype.itemsize
    shards = plan_shards(shapes, itemsize, max_shard_bytes)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        writing: Future | None = None
        for k, names in enumerate(shards, start=1):
            filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: _make_tensor(name, shapes[name], cfg, gen, dtype) for name in names}
            if writing is not None:
                writing.result()
            writing = pool.submit(write_shard, out / filename, tensors)
            if gen.device.type == "cpu":
                writing.result()
            del tensors
            weight_map.update(dict.fromkeys(names, filename))
        if writing is not None:
            writing.result()
    index = {
        "metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * itemsize},
        "weight_map": {name: weight_map[name] for name in shapes},  # reference state_dict order
    }
    _write_json(out / "model.safetensors.index.json", index)


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, complete under its final name or absent (`fsio.publish`)."""
    tmp = temp_path(path)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)  # safetensors creates files owner-only
    publish(tmp, path)


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, filled greedily in generation (sorted name) order.

    A shard is closed when the next tensor would overflow it; a tensor larger than the limit gets
    a shard of its own (as in huggingface_hub). Planning first gives the `-of-N` file names.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def init_recipe(name: str, shape: tuple[int, ...], cfg: CogVLMConfig) -> tuple[float, float, float]:
    """(mul, div, add) with value = randn * mul / div + add, the golden README's "Weights" scheme.

    Kept as the golden harness computed them (lm_head multiplies by 2/sqrt(hidden), the other
    weights divide by sqrt(fan_in)): another grouping of the same factors rounds differently.
    """
    leaf = name.rsplit(".", 1)[-1]
    if name == "model.embed_tokens.weight" or leaf in ("cls_embedding", "boi", "eoi"):
        return 1.0, 1.0, 0.0
    if name == "lm_head.weight":
        return 2.0 / math.sqrt(cfg.hidden_size), 1.0, 0.0
    if name.endswith("position_embedding.weight"):
        return 0.5, 1.0, 0.0
    if leaf == "weight" and "norm" in name:  # RMSNorm and LayerNorm weights, linear_proj.norm1 included
        return 0.1, 1.0, 1.0
    if leaf == "bias":
        return 0.1, 1.0, 0.0
    if len(shape) == 4:  # convolutions: fan_in = C_in * k * k
        return 1.0, math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if len(shape) == 2:
        return 1.0, math.sqrt(shape[1]), 0.0
    raise ValueError(f"no init rule for {name} {shape}")


def rotary_inv_freq(cfg: CogVLMConfig) -> torch.Tensor:
    """The persistent rotary buffer the reference stores in its state_dict (fp32 values)."""
    hd = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


def _make_tensor(
    name: str, shape: tuple[int, ...], cfg: CogVLMConfig, gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    if name.endswith("rotary_emb.inv_freq"):
        return rotary_inv_freq(cfg).to(dtype)  # a buffer: computed, draws nothing from the generator
    recipe = init_recipe(name, shape, cfg)
    if gen.device.type == "cpu":
        return _random_tensor(shape, recipe, gen, dtype)
    mul, div, add = recipe  # on an accelerator: one draw of the whole tensor, the same arithmetic
    x = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
    return x.mul_(mul).div_(div).add_(add).to(dtype).cpu()


def _random_tensor(
    shape: tuple[int, ...], recipe: tuple[float, float, float], gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """randn(shape) * mul / div + add in `dtype`, drawn in fp32 chunks to bound peak memory.

    torch's CPU normal sampler turns uniform draws into normals in blocks of 16, so chunks whose
    sizes are multiples of 16 (with a last chunk of at least 16) draw exactly the values of one
    big `torch.randn(shape)` call (tests/unit/testing/test_tiny.py checks it).
    """
    mul, div, add = recipe
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    n = flat.numel()
    start = 0
    while start < n:
        stop = min(start + _RANDN_CHUNK, n)
        if 0 < n - stop < 16:
            stop = n
        x = torch.randn(stop - start, generator=gen)
        if mul != 1.0:
            x.mul_(mul)
        if div != 1.0:
            x.div_(div)
        if add != 0.0:
            x.add_(add)
        flat[start:stop] = x  # rounds to `dtype`
        start = stop
    return out


# --------------------------------------------------------------------------------------------
# tokenizer


# --------------------------------------------------------------------------------------------
# files

# Everything this module writes; with overwrite=True only these are removed first.
_OUTPUT_PATTERNS = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    ".tmp-*",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _prepare_out_dir(out: Path, overwrite: bool) -> Path:
    """Create `out`; refuse a non-empty one unless `overwrite`, then clear what we would write.

    Stale shards of a previous run (another -of-N) would otherwise sit beside the new index.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace its checkpoint")
        for pattern in _OUTPUT_PATTERNS:
            for path in out.glob(pattern):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

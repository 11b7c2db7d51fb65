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
* the tokenizer is trained with `tokenizers` on a small built-in English corpus: a vicuna-like
  byte-fallback BPE for CogVLM, a Llama-3-like byte-level BPE with the 256 Llama-3 special tokens
  at their real ids (128000..128255) for CogVLM2.

Same arguments and seed give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes

ARCHS = {"cogvlm": "cogvlm1", "cogvlm1": "cogvlm1", "cogvlm2": "cogvlm2"}
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "float32"),
    "float32": (torch.float32, "float32"),
    "fp16": (torch.float16, "float16"),
    "float16": (torch.float16, "float16"),
    "bf16": (torch.bfloat16, "bfloat16"),
    "bfloat16": (torch.bfloat16, "bfloat16"),
}

LLAMA3_VOCAB_SIZE = 128_256  # 128000 BPE entries + 256 special tokens
LLAMA3_FIRST_SPECIAL_ID = 128_000
LLAMA3_PAD_TOKEN = "<|reserved_special_token_0|>"  # id 128002: CogVLM2's pad and image placeholder
# The Llama-3 pre-tokenizer regex (tiktoken's cl100k pattern), as in the real tokenizer.json.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in vicuna; 256 byte tokens follow
_LLAMA2_BASE_VOCAB = len(LLAMA2_SPECIALS) + 256

# Real configs: the reference code was written for this version; keeping it also keeps every
# version-dependent heuristic of transformers behaving as it does on the real checkpoints.
_TRANSFORMERS_VERSION = "4.40.2"
_AUTO_MAP = {
    "AutoConfig": "configuration_cogvlm.CogVLMConfig",
    "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
}
_RANDN_CHUNK = 1 << 22  # elements drawn per torch.randn call; must stay a multiple of 16 (see _random_tensor)

# A fixed training corpus: caption and VQA vocabulary, the words of the chat templates, digits
# and punctuation, so that every prompt the tests use tokenizes into real (non-byte) pieces.
_CORPUS = (
    "Describe this image.",
    "Describe the image in detail.",
    "Describe the picture in one sentence.",
    "Write a short caption for this photo, please mention the colors and the shapes.",
    "Write a detailed caption for the picture.",
    "What is in the picture?",
    "What is the color of the small square in the picture?",
    "What color is the large circle?",
    "What is the person holding in the photo?",
    "How many objects are there in the image?",
    "How many people are standing near the table?",
    "Is there a dog in the photo? Answer yes or no.",
    "Where is the red square?",
    "Which shape is on the left side of the image?",
    "Question: What is shown in the image? Answer: A red square and a green circle.",
    "Question: Describe this image. Answer: A blue triangle on a white background.",
    "USER: What is in the picture? ASSISTANT: A red square and a green circle.",
    "USER: Describe the photo. ASSISTANT: A cat is sitting on a wooden chair near the window.",
    "A red square and a green circle.",
    "A small red square is in the top left corner of the picture.",
    "A large green circle is in the center of the image.",
    "A blue triangle and a yellow star on a black background.",
    "The square is red, the circle is green and the triangle is blue.",
    "The colors are red, green, blue, yellow, orange, purple, black, white, gray and brown.",
    "The photo shows a dog playing with a ball in the park.",
    "The picture shows a man riding a bicycle on the street.",
    "The image shows two people sitting at a table with food and drinks.",
    "A woman is holding an umbrella in the rain.",
    "A bowl of fruit with apples, bananas and oranges on a kitchen table.",
    "A city street at night with cars, buses and bright lights.",
    "A mountain lake under a clear blue sky with white clouds.",
    "A child is reading a book on a sofa in the living room.",
    "There are three apples and two bananas on the plate.",
    "There is one cat and there are 2 dogs in the garden.",
    "The answer is yes. The answer is no.",
    "The caption of the photo: a sunny beach with people and colorful umbrellas.",
    "Answer the question about the image with a single word or phrase.",
    "Please answer the question in detail and explain the answer.",
    "The question asks about the color of the square, the answer is red.",
    "In the image, a brown horse is standing in a green field next to a fence.",
    "The room has white walls, a wooden floor, a bed and a small desk with a lamp.",
    "Two birds are flying over the water near the boats.",
    "A plate of pasta with tomato sauce and cheese.",
    "The train is arriving at the station, and people are waiting on the platform.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 100 2024.",
    "Shapes: square, circle, triangle, rectangle, star, line, dot.",
    "Positions: left, right, top, bottom, center, corner, above, below, next to.",
    "Sizes: small, large, big, tiny, long, short, tall, wide.",
    "This is a photo of a square. This is a picture of a circle. This is an image of a line.",
    "Can you describe the colors and the shapes in this picture?",
    "What does the text in the image say? The text says hello world.",
    "The image is a simple drawing with a red square, a green circle and a blue line.",
)


def write_tiny_checkpoint(
    out_dir: str | Path,
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
    dtype: str = "fp32",
    shard_size: int | str = "200MB",
    seed: int = 0,
    rms_norm_eps: float = 1e-5,
    vision_layer_norm_eps: float = 1e-6,
    overwrite: bool = False,
) -> Path:
    """Write a random checkpoint in the official layout to `out_dir` and return its path.

    Defaults, per `arch` ("cogvlm"/"cogvlm1" or "cogvlm2"):
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
    torch_dtype, dtype_name = _resolve_dtype(dtype)
    max_shard_bytes = parse_size(shard_size)
    config = tiny_config(
        arch=arch,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        vision_hidden_size=vision_hidden_size,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        vision_intermediate_size=vision_intermediate_size,
        image_size=image_size,
        patch_size=patch_size,
        vocab_size=vocab_size,
        torch_dtype=dtype_name,
        rms_norm_eps=rms_norm_eps,
        vision_layer_norm_eps=vision_layer_norm_eps,
    )
    cfg = CogVLMConfig.from_dict(config)  # raises ConfigError (a ValueError) on inconsistent sizes
    tokenizer, tokenizer_config, special_tokens = build_tokenizer(cfg)  # may reject vocab_size, still nothing written

    out = _prepare_out_dir(Path(out_dir), overwrite)
    write_weights(out, cfg, dtype=torch_dtype, max_shard_bytes=max_shard_bytes, seed=seed)
    tokenizer.save(str(out / "tokenizer.json.tmp"), pretty=True)
    _publish(out / "tokenizer.json.tmp", out / "tokenizer.json")
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
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected fp32, fp16 or bf16") from None


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from 123, "200MB" or "1.5GiB"; KB/MB/GB are decimal like Hugging Face's max_shard_size."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]i?b|b)?\s*", str(size).lower())
        if m is None:
            raise ValueError(f"cannot read a size from {size!r}: use bytes or e.g. '200MB', '2MB', '1GB'")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    if value < 1:
        raise ValueError(f"shard size must be at least 1 byte, got {size!r}")
    return value


# --------------------------------------------------------------------------------------------
# weights


def write_weights(out: Path, cfg: CogVLMConfig, *, dtype: torch.dtype, max_shard_bytes: int, seed: int) -> None:
    """Draw and write the shards one at a time, then the index; never all weights in memory."""
    shapes = checkpoint_tensor_shapes(cfg)
    itemsize = dtype.itemsize
    shards = plan_shards(shapes, itemsize, max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _make_tensor(name, shapes[name], cfg, gen, dtype) for name in names}
        tmp = out / (filename + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)  # safetensors creates files owner-only
        _publish(tmp, out / filename)
        del tensors
        weight_map.update(dict.fromkeys(names, filename))
    index = {
        "metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * itemsize},
        "weight_map": {name: weight_map[name] for name in shapes},  # reference state_dict order
    }
    _write_json(out / "model.safetensors.index.json", index)


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
    return _random_tensor(shape, init_recipe(name, shape, cfg), gen, dtype)


def _random_tensor(
    shape: tuple[int, ...], recipe: tuple[float, float, float], gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """randn(shape) * mul / div + add in `dtype`, drawn in fp32 chunks to bound peak memory.

    torch's CPU normal sampler turns uniform draws into normals in blocks of 16, so chunks whose
    sizes are multiples of 16 (with a last chunk of at least 16) draw exactly the values of one
    big `torch.randn(shape)` call (tests/unit/test_tiny.py checks it).
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


def build_tokenizer(cfg: CogVLMConfig) -> tuple[Tokenizer, dict[str, Any], dict[str, str]]:
    """(tokenizer, tokenizer_config.json, special_tokens_map.json) for the config's generation."""
    if cfg.generation == "cogvlm2":
        return (
            _llama3_tokenizer(),
            _llama3_tokenizer_config(),
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": LLAMA3_PAD_TOKEN,
            },
        )
    return (
        _llama2_tokenizer(cfg.vocab_size),
        _llama2_tokenizer_config(),
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<unk>",
            "unk_token": "<unk>",
        },
    )


def _train_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, trainer: trainers.BpeTrainer) -> dict[str, Any]:
    """Train on the built-in corpus and return the BPE model (vocab and merges) as JSON.

    The trainer sorts its alphabet and breaks count ties by token ids, so the result does not
    depend on threads or hash seeds.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return json.loads(tok.to_str())["model"]


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """Merges as pairs, whichever of the two JSON spellings ("a b" or ["a", "b"]) tokenizers used."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _llama2_tokenizer(vocab_size: int) -> Tokenizer:
    """A vicuna-like BPE: <unk> <s> </s>, the 256 byte-fallback tokens <0x00>..<0xFF>, then merges.

    Trained with a Metaspace split so merges never cross words; used with the same normalizer
    (prepend and replace by "▁") and decoder as the Llama-2 tokenizer.json that transformers
    converts from vicuna's SentencePiece model.
    """
    trained = _train_bpe(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        trainers.BpeTrainer(vocab_size=max(vocab_size - _LLAMA2_BASE_VOCAB, 1), min_frequency=2, show_progress=False),
    )
    if _LLAMA2_BASE_VOCAB + len(trained["vocab"]) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for the cogvlm1 tiny tokenizer: it needs {_LLAMA2_BASE_VOCAB} "
            f"special and byte tokens plus the corpus alphabet (at least "
            f"{_LLAMA2_BASE_VOCAB + len(trained['vocab'])} in all)"
        )
    vocab = {t: i for i, t in enumerate(LLAMA2_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(LLAMA2_SPECIALS) + b for b in range(256)})
    for token, i in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab[token] = _LLAMA2_BASE_VOCAB + i
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merge_pairs(trained["merges"]), unk_token="<unk>", fuse_unk=True, byte_fallback=True
        )
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA2_SPECIALS])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _llama2_tokenizer_config() -> dict[str, Any]:
    """As vicuna-7b-v1.5 (which cogvlm-chat-hf uses): pad is <unk> = 0, bos added, eos not."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens, in id order from 128000 (`<|eot_id|>` is 128009)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        9: "<|eot_id|>",
    }
    reserved = iter(range(256))
    return [named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(256)]


def _llama3_tokenizer() -> Tokenizer:
    """A byte-level BPE shaped like Llama-3's: real pieces first, filler up to 127999, then specials.

    The filler entries `<|tiny_unused_i|>` are never produced from text (no merge builds them);
    they exist so the special tokens get their real ids, which the reference code hard-codes.
    """
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trained = _train_bpe(
        pre_tokenizer,
        trainers.BpeTrainer(
            vocab_size=1024, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    vocab = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    for i in range(len(vocab), LLAMA3_FIRST_SPECIAL_ID):
        vocab[f"<|tiny_unused_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(trained["merges"])))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in llama3_special_tokens()])
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0",
        pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", LLAMA3_FIRST_SPECIAL_ID)],
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _llama3_tokenizer_config() -> dict[str, Any]:
    """As Meta-Llama-3, loaded through PreTrainedTokenizerFast, with the pad token set.

    The real Llama-3 tokenizer has no pad token; the reference `build_conversation_input_ids` sets
    `tokenizer.pad_token_id = 128002` itself. Writing it here lets generic tooling pad batches.

    clean_up_tokenization_spaces is off (the real file says true): it would strip spaces before
    punctuation on decode, and transformers 5 ignores it for BPE with a warning anyway.
    """
    added = {
        str(LLAMA3_FIRST_SPECIAL_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, content in enumerate(llama3_special_tokens())
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|end_of_text|>",
        "pad_token": LLAMA3_PAD_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --------------------------------------------------------------------------------------------
# files

# Everything this module writes; with overwrite=True only these are removed first.
_OUTPUT_PATTERNS = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "*.tmp",
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    _publish(tmp, path)


def _publish(tmp: Path, path: Path) -> None:
    """fsync then rename: a file under its final name is always complete."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)

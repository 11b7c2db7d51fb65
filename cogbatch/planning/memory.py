"""The memory model: predicted peak device memory of each phase of the pipeline's generation path.

Predicted peak device memory of the pipeline's generation path (`cogbatch.model.decoding`):

    weights resident on the device (both parts, or in swap mode only the part of the phase)
  + the slot KV cache                                 (slots x (prefix + prompt + max_new_tokens) x KV bytes)
  + one held image prefix                             (an image whose requests still wait for a slot: only
                                                       when an image has several requests, `shares_prefixes`)
  + the largest transient                             (prompt prefill of a full batch, or the prefill of one
                                                       image prefix with its own KV; prefixes are made one
                                                       image at a time, when their first request enters)
  + the largest dense copy of a quantized weight      (quanto's dequantize fallback, int8 on CUDA, and dynamic
                                                       dequantization expand a weight for one call)
  + a safety margin

and, in the vision phase, the vision tower's activations for `encode_batch` images and their
features (features wait for the language phase in host memory). KV bytes per token = 2 (k, v) x
layers x kv heads x head dim x dtype bytes: 128 KiB for CogVLM2 in bf16 (GQA), 512 KiB for CogVLM;
a CogVLM2 image prefix is 2,307 tokens, ~0.28 GiB. An 8-bit KV cache (`kv_cache: int8`) stores each
head's vector in head-dim bytes plus one scale in the dtype (~0.5x, 258 KiB per CogVLM token) and
reads one layer at a time dequantized: k and v of every row up to its length in the dtype, a
transient counted in each pass's activations. The same model feeds `cogbatch plan` (from the
config, without weights) and the worker (from the loaded model); on CUDA the worker scales its
estimates by what `torch.cuda.max_memory_allocated()` measured in each phase of the first chunk.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from cogbatch.model.config import CogVLMConfig

GiB = 2**30


@dataclass
class MemoryModel:
    cfg: CogVLMConfig
    dtype_bytes: int
    weights_vision: int  # device bytes of the vision tower
    weights_language: int  # everything else resident on the device (decoder, embeddings, lm_head)
    materialized_attention: bool  # CPU / math SDPA keeps full score matrices; flash kernels do not
    margin: int = 512 * 2**20
    correction: float = 1.0  # >= 1 after calibration or an out-of-memory error
    # The largest dense copy of a quantized weight one call makes, per phase (`largest_dense_copy`)
    dense_vision: int = 0
    dense_language: int = 0
    kv_dtype: str = "none"  # the KV cache's storage: "none" (the dtype) or "int8"
    # An image's prefix waits in device memory for the image's other requests (`shares_prefixes`);
    # with one request per image it is copied into its slot and dropped at once.
    shared_prefixes: bool = True

    @property
    def kv_per_token(self) -> int:
        c = self.cfg
        if self.kv_dtype == "int8":
            return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.head_dim + self.dtype_bytes)
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype_bytes

    def kv_read(self, rows: int, keys: int) -> int:
        """The one layer's keys and values an int8 cache dequantizes for attention (0 for a 16-bit cache)."""
        if self.kv_dtype != "int8":
            return 0
        return 2 * rows * self.cfg.num_key_value_heads * keys * self.cfg.head_dim * self.dtype_bytes

    @property
    def prefix_tokens(self) -> int:
        return self.cfg.vision_tokens + 1

    def vision_activations(self, images: int) -> int:
        """Peak transient of one vision-tower pass over `images` images."""
        v, b = self.cfg.vision, self.dtype_bytes
        n = v.grid**2 + 1
        per_layer = n * (6 * v.hidden_size + v.intermediate_size) * b
        scores = v.num_heads * n * n * 4 if self.materialized_attention else 0
        glu = self.cfg.vision_tokens * (2 * self.cfg.hidden_size + 2 * self.cfg.intermediate_size) * b
        return int(self.correction * images * (per_layer + scores + glu))

    def prefill_activations(self, rows: int, tokens: int, keys: int) -> int:
        """Peak transient of a language-model pass over `rows` x `tokens` new tokens seeing `keys` keys."""
        c, b = self.cfg, self.dtype_bytes
        t = rows * tokens
        hidden = t * (8 * c.hidden_size + c.qkv_out_features + 3 * c.intermediate_size) * b
        scores = rows * c.num_attention_heads * tokens * keys * 4 if self.materialized_attention else 0
        bias = rows * tokens * keys * b
        logits = rows * c.vocab_size * 4
        return int(self.correction * (hidden + scores + bias + logits + self.kv_read(rows, keys)))

    def context_overrun(self, max_text: int, max_new: int) -> str | None:
        """Why an image + a prompt + `max_new` new tokens pass the model's context, or None if they fit."""
        context = self.cfg.max_position_embeddings
        if self.prefix_tokens + max_text + max_new <= context:
            return None
        return (f"max_new_tokens {max_new}: an image ({self.prefix_tokens} tokens) + a prompt + that many new "
                f"tokens passes the model's context of {context} tokens")  # fmt: skip

    def kv(self, tokens: int) -> int:
        return int(self.correction * tokens * self.kv_per_token)

    def features(self, images: int) -> int:
        """Vision-tower output of `images` images, the language model's input (~19 MB per CogVLM2 image)."""
        return images * self.cfg.vision_tokens * self.cfg.hidden_size * self.dtype_bytes

    def weights(self, with_vision: bool, with_language: bool) -> int:
        return (self.weights_vision if with_vision else 0) + (self.weights_language if with_language else 0)

    def decode_parts(self, slots: int, max_text: int, max_new: int, with_vision: bool) -> dict[str, int]:
        """What the language phase's peak is made of, with `slots` sequences in flight (`cogbatch plan -v`).

        The transient is the larger of prefilling the prompts of a full batch at once and making one
        image's prefix (its activations, its own KV cache and the image's features).
        """
        P = self.prefix_tokens
        seq = P + max_text + max_new
        prompts = self.prefill_activations(slots, max_text, seq)
        prefix = self.prefill_activations(1, P, P) + self.kv(P) + self.features(1)
        return {
            "weights": self.weights(with_vision, True),
            "kv_cache": self.kv(slots * seq),
            "waiting_prefix": self.kv(P) if self.shared_prefixes else 0,  # its image's other requests wait
            "prompt_prefill" if prompts >= prefix else "prefix_prefill": max(prompts, prefix),
            "dense_copy": self.dense_language,
            "seen_tokens": slots * self.cfg.vocab_size,  # the repetition penalty's token set per slot (bool)
            "margin": self.margin,
        }

    def decode_work(self, slots: int, max_text: int, max_new: int) -> int:
        """Device bytes of the language phase beyond the weights, with `slots` sequences in flight."""
        parts = self.decode_parts(slots, max_text, max_new, False)
        return sum(parts.values()) - parts["weights"] - parts["margin"]

    def decode_peak(self, slots: int, max_text: int, max_new: int, with_vision: bool) -> int:
        """Peak of the language phase: `slots` sequences in flight."""
        return sum(self.decode_parts(slots, max_text, max_new, with_vision).values())

    def encode_parts(self, images: int, with_language: bool) -> dict[str, int]:
        """What the vision phase's peak is made of, for `images` images at once."""
        return {
            "weights": self.weights(True, with_language),
            "vision_activations": self.vision_activations(images),
            "features": self.features(images),
            "dense_copy": self.dense_vision,
            "margin": self.margin,
        }

    def encode_work(self, images: int) -> int:
        """Device bytes of one vision-tower pass over `images` images beyond the weights."""
        return self.vision_activations(images) + self.features(images) + self.dense_vision

    def encode_peak(self, images: int, with_language: bool) -> int:
        """Peak of the vision phase for `images` images."""
        return sum(self.encode_parts(images, with_language).values())


def shares_prefixes(tasks: Any) -> bool:
    """Whether an image may have several requests, so its prefix waits in device memory for the next one.

    Several tasks ask about every image; one task whose prompts come from a manifest column may ask
    about the same image in several rows. One fixed prompt per image never holds a prefix.
    """
    return len(tasks) > 1 or any(t.question_column for t in tasks)


def memory_model_for(model: Any) -> MemoryModel:
    """The memory model of a loaded model: weight bytes measured on its device, not guessed."""
    import torch

    device = model.device

    def device_bytes(module: torch.nn.Module) -> int:
        total = 0
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device == device:
                total += _tensor_bytes(t)
        return total

    tower = model.vision_tower
    # A tower parked in host memory at load (`park_vision`) comes to the device for its phase: count it.
    vision = sum(_tensor_bytes(t) for t in [*tower.parameters(), *tower.buffers()])
    parked = vision - device_bytes(tower)
    dense_vision = dense_language = 0
    if "cogbatch.model.quant.linear" in sys.modules:  # a quantized model was loaded (else quanto is not needed)
        from cogbatch.model.quant.linear import largest_dense_copy

        dense_vision = largest_dense_copy(tower.modules(), model.dtype)
        language = (m for part in model.language_parts() for m in part.modules())
        dense_language = largest_dense_copy(language, model.dtype)
    return MemoryModel(
        cfg=model.config,
        dtype_bytes=torch.finfo(model.dtype).bits // 8,
        weights_vision=vision,
        weights_language=device_bytes(model) + parked - vision,
        materialized_attention=device.type != "cuda",
        dense_vision=dense_vision,
        dense_language=dense_language,
        kv_dtype=getattr(model, "kv_cache", "none"),
    )


def planned_dense_copies(
    cfg: CogVLMConfig, quant: Any, device_type: str, dtype: Any, capability: tuple[int, int] | None = None
) -> dict[str, int]:
    """`largest_dense_copy` per phase predicted from the rules alone (for `cogbatch plan`, no model).

    CUDA: int8 layers (dequantize + matmul), and int4 layers other than bf16 with group 128 on sm80+
    (TinyGemm; `capability` None = not known, planned as sm80+). fp16 on sm80+ may get quanto's
    fused AWQ kernel, but only after a JIT CUDA build: it is planned as the fallback. CPU: every
    quantized layer (dynamic dequantization, into fp32 at worst).
    """
    import torch

    from cogbatch.model.quant.plan import component_of, linear_layers, plan_layers

    dense = {"vision": 0, "language": 0}
    shapes = linear_layers(cfg)
    for name, lp in plan_layers(cfg, quant).items():
        if device_type == "cuda":
            fused = capability is None or capability >= (8, 0)
            if lp.qtype == "int4" and dtype == torch.bfloat16 and lp.group_size == 128 and fused:
                continue
            nbytes = dtype.itemsize
        else:
            nbytes = 4
        out_f, in_f = shapes[name]
        part = "vision" if component_of(name) == "vision" else "language"
        dense[part] = max(dense[part], out_f * in_f * nbytes)
    return dense


def _tensor_bytes(t: Any) -> int:
    """Storage bytes of a tensor, including quantized tensors whose data live in inner tensors."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def calibrate(mm: MemoryModel, predicted: int, measured: int) -> None:
    """Scale future estimates when a phase used more device memory than predicted (never scale down).

    Both figures are bytes beyond what was resident when the phase began (the weights of the
    parts on the device), so the ratio means the same in resident and in phase-swapped mode.
    """
    if predicted > 0 and measured > predicted:
        mm.correction *= math.ceil(100 * measured / predicted) / 100

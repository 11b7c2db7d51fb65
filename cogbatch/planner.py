"""Memory model and batch planning: how many sequences fit under the VRAM ceiling, and how to run them.

Predicted peak device memory of the pipeline's generation path (`cogbatch.model.decoding`):

    weights resident on the device (both parts, or in swap mode only the part of the phase)
  + the slot KV cache                                 (slots x (prefix + prompt + max_new_tokens) x KV bytes)
  + one held image prefix                             (an image whose requests still wait for a slot)
  + the largest transient                             (prompt prefill of a full batch, or the prefill of one
                                                       image prefix with its own KV; prefixes are made one
                                                       image at a time, when their first request enters)
  + the largest dense copy of a quantized weight      (quanto's dequantize fallback, int8 on CUDA, and dynamic
                                                       dequantization expand a weight for one call)
  + a safety margin

and, in the vision phase, the vision tower's activations for `encode_batch` images and their
features (features wait for the language phase in host memory). KV bytes per token = 2 (k, v) x
layers x kv heads x head dim x dtype bytes: 128 KiB for CogVLM2 in bf16 (GQA), 512 KiB for CogVLM;
a CogVLM2 image prefix is 2,307 tokens, ~0.28 GiB. The same model feeds `cogbatch plan` (from the
config, without weights) and the runner (from the loaded model); on CUDA the runner scales its
estimates by what `torch.cuda.max_memory_allocated()` measured in each phase of the first chunk.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from cogbatch.errors import ConfigError, DoesNotFit
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

    @property
    def kv_per_token(self) -> int:
        c = self.cfg
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype_bytes

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
        return int(self.correction * (hidden + scores + bias + logits))

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

    def engine_work(self, slots: int, max_text: int, max_new: int) -> int:
        """Device bytes of the language phase beyond the weights, with `slots` sequences in flight."""
        P = self.prefix_tokens
        seq = P + max_text + max_new
        transient = max(
            self.prefill_activations(slots, max_text, seq),  # the prompts of a full batch at once
            self.prefill_activations(1, P, P) + self.kv(P) + self.features(1),  # making one image's prefix
        )
        held = self.kv(P)  # the prefix of an image whose other requests still wait for a slot
        seen = slots * self.cfg.vocab_size  # the repetition penalty's token set per slot (bool)
        return self.kv(slots * seq) + held + transient + self.dense_language + seen

    def engine_peak(self, slots: int, max_text: int, max_new: int, with_vision: bool) -> int:
        """Peak of the language phase: `slots` sequences in flight."""
        return self.weights(with_vision, True) + self.engine_work(slots, max_text, max_new) + self.margin

    def encode_work(self, images: int) -> int:
        """Device bytes of one vision-tower pass over `images` images beyond the weights."""
        return self.vision_activations(images) + self.features(images) + self.dense_vision

    def encode_peak(self, images: int, with_language: bool) -> int:
        """Peak of the vision phase for `images` images."""
        return self.weights(True, with_language) + self.encode_work(images) + self.margin


REASONABLE_BATCH = 4  # resident mode is kept when it decodes this many sequences together
MAX_CHUNK_IMAGES = 64  # host memory per chunk: decoded pixels and features, ~40 MB per CogVLM2 image


@dataclass
class Plan:
    mode: str  # "resident": every weight stays on the device; "swap": vision and language take turns
    slots: int  # sequences decoded together
    encode_batch: int  # images per vision-tower pass
    chunk_images: int  # images per `Worker.process` call: one vision phase, then one decode engine
    peak_bytes: int
    ceiling: int
    per_request_bytes: int  # KV cache of one sequence (prefix + prompt + max_new_tokens)
    max_text: int = 128  # prompt tokens planned for
    max_new: int = 256  # new tokens planned for
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chunk_images_for(slots: int) -> int:
    """Images per chunk: at least two requests per slot even with one task, so a finished sequence
    always has a successor (continuous refill), and up to four while the chunk stays <= 64 images."""
    return max(2 * slots, min(4 * slots, MAX_CHUNK_IMAGES))


def plan_batches(
    mm: MemoryModel, ceiling: int, max_text: int, max_new: int, cap: int = 64, encode_cap: int | None = None
) -> Plan:
    """The largest batch whose predicted peak stays under `ceiling`, and the execution mode.

    Every weight stays resident when that fits a batch of at least `REASONABLE_BATCH` (4), or of
    as many sequences as phase swapping would allow: swapping moves the language model and the
    vision tower over PCIe for every chunk. Otherwise phase swapping is used when it fits (the
    model does not fit with both parts resident and a reasonable batch). `cap` bounds the batch
    (the job's `batch_size`), `encode_cap` the vision batch (lowered after an out-of-memory error).
    """
    resident, swap = (_plan_mode(mm, ceiling, max_text, max_new, cap, encode_cap, m) for m in ("resident", "swap"))
    if resident and (swap is None or resident.slots >= min(REASONABLE_BATCH, swap.slots)):
        return resident
    if swap:
        if resident:
            swap.notes.append(f"with every weight resident only a batch of {resident.slots} fits")
        return swap
    need = min(
        max(mm.engine_peak(1, max_text, max_new, False), mm.encode_peak(1, False)),
        max(mm.engine_peak(1, max_text, max_new, True), mm.encode_peak(1, True)),
    )
    raise DoesNotFit(
        f"the model needs about {need / GiB:.2f} GiB for a single request "
        f"(weights {(mm.weights_vision + mm.weights_language) / GiB:.2f} GiB), but the ceiling is "
        f"{ceiling / GiB:.2f} GiB; raise vram_ceiling, quantize more (int4), or use a bigger device"
    )


def _plan_mode(
    mm: MemoryModel, ceiling: int, max_text: int, max_new: int, cap: int, encode_cap: int | None, mode: str
) -> Plan | None:
    """The largest batch in one execution mode, or None when a single request does not fit."""
    both = mode == "resident"

    def peak(s: int) -> int:
        return max(mm.engine_peak(s, max_text, max_new, both), mm.encode_peak(1, both))

    if peak(1) > ceiling:
        return None
    slots = 1
    while slots < cap and peak(slots + 1) <= ceiling:
        slots += 1
    chunk = chunk_images_for(slots)
    encode = 1
    while encode < min(chunk, cap, encode_cap or cap) and mm.encode_peak(encode + 1, both) <= ceiling:
        encode += 1
    notes = []
    if mode == "swap":
        notes.append("vision tower and language model take turns on the device (phase-swapped)")
    per_request = mm.kv(mm.prefix_tokens + max_text + max_new)
    top = max(mm.engine_peak(slots, max_text, max_new, both), mm.encode_peak(encode, both))
    return Plan(mode, slots, encode, chunk, top, ceiling, per_request, max_text, max_new, notes)


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

    vision = device_bytes(model.model.vision)
    dense_vision = dense_language = 0
    if "cogbatch.model.quant.linear" in sys.modules:  # a quantized model was loaded (else quanto is not needed)
        from cogbatch.model.quant.linear import largest_dense_copy

        dense_vision = largest_dense_copy(model.model.vision.modules(), model.dtype)
        rest = (m for name, m in model.named_modules() if not name.startswith("model.vision."))
        dense_language = largest_dense_copy(rest, model.dtype)
    return MemoryModel(
        cfg=model.config,
        dtype_bytes=torch.finfo(model.dtype).bits // 8,
        weights_vision=vision,
        weights_language=device_bytes(model) - vision,
        materialized_attention=device.type != "cuda",
        dense_vision=dense_vision,
        dense_language=dense_language,
    )


def planned_dense_copies(cfg: CogVLMConfig, quant: Any, device_type: str, dtype: Any) -> dict[str, int]:
    """`largest_dense_copy` per phase predicted from the rules alone (for `cogbatch plan`, no model).

    CUDA: int8 layers (dequantize + matmul), and int4 layers other than bf16 with group 128 (the
    fallback before sm80; fp16 on sm80+ gets the fused AWQ kernel, counted anyway as the GPU is
    unknown here). CPU: every quantized layer (dynamic dequantization, into fp32 at worst).
    """
    import torch

    from cogbatch.model.quant.plan import component_of, linear_layers, plan_layers

    dense = {"vision": 0, "language": 0}
    shapes = linear_layers(cfg)
    for name, lp in plan_layers(cfg, quant).items():
        if device_type == "cuda":
            if lp.qtype == "int4" and dtype == torch.bfloat16 and lp.group_size == 128:
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


def job_plan(job: Any, max_text: int = 128) -> dict[str, Any]:
    """`cogbatch plan`: predicted device memory of a job's model and the batches that fit, from config.json alone.

    Weight bytes come from the checkpoint's tensor shapes under the job's quantization rules (no
    weights are read); both execution modes are reported so a user sees what phase swapping buys.
    """
    import torch

    from cogbatch.model.quant.plan import predict_weight_bytes
    from cogbatch.worker import resolved_dtype

    cfg = model_config_for(job)
    device = torch.device(
        "cuda"
        if job.device == "auto" and torch.cuda.is_available()
        else ("cpu" if job.device == "auto" else job.device)
    )
    notes = []
    if device.type == "cuda" and not torch.cuda.is_available():  # planning for a GPU from a laptop or login node
        from cogbatch.model.cogvlm import resolve_dtype

        dtype = torch.bfloat16 if job.dtype == "auto" else resolve_dtype(job.dtype, device)
        if job.dtype == "auto":
            notes.append("no CUDA device here: planned for bf16, what dtype auto picks on an Ampere or newer GPU "
                         "(set dtype: fp16 for an older one)")  # fmt: skip
    else:
        dtype = getattr(torch, resolved_dtype(job))
    if job.device == "auto" and device.type == "cpu":
        notes.append("device auto on a machine without CUDA: planned for the CPU (--device cuda plans for a GPU)")
    quant = job.quantization.effective()
    weights = predict_weight_bytes(cfg, quant, dtype)
    max_new = max(t.generation.max_new_tokens for t in job.tasks)
    dense = planned_dense_copies(cfg, quant, device.type, dtype)
    mm = MemoryModel(
        cfg,
        torch.finfo(dtype).bits // 8,
        weights["vision"],
        weights["device"] - weights["vision"],
        materialized_attention=device.type != "cuda",
        dense_vision=dense["vision"],
        dense_language=dense["language"],
    )
    overrun = mm.context_overrun(max_text, max_new)
    if overrun:
        notes.append(overrun)
    if dense["language"] or dense["vision"]:
        notes.append(f"quantized layers expand to a dense copy per call: up to {dense['language'] / GiB:.2f} GiB "
                     f"(language) / {dense['vision'] / GiB:.2f} GiB (vision), counted in each phase")  # fmt: skip
    modes = {}
    for mode, both in (("resident", True), ("swap", False)):
        peak1 = max(mm.engine_peak(1, max_text, max_new, both), mm.encode_peak(1, both))
        largest = _plan_mode(mm, job.vram_ceiling, max_text, max_new, 256, None, mode)
        slots = largest.slots if largest else 0
        modes[mode] = {"peak_bytes_batch_1": peak1, "fits": slots > 0, "largest_batch": slots}
    try:
        chosen = plan_batches(mm, job.vram_ceiling, max_text, max_new, cap=job.batch_size or 64).to_dict()
    except DoesNotFit as e:
        chosen = {"mode": None, "error": str(e)}
    return {
        "model": job.model,
        "generation": cfg.generation,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": job.quantization.label(),
        "vram_ceiling": job.vram_ceiling,
        "weights": weights,
        "per_request": {
            "kv_cache_bytes": mm.kv(mm.prefix_tokens + max_text + max_new),
            "image_prefix_bytes": mm.kv(mm.prefix_tokens),
            "vision_activation_bytes_per_image": mm.vision_activations(1),
            "assumed_prompt_tokens": max_text,
            "max_new_tokens": max_new,
        },
        "dense_copy_bytes": dense,
        "modes": modes,
        "plan": chosen,
        "notes": notes,
    }


def model_config_for(job: Any) -> CogVLMConfig:
    """The model's config.json: a local checkpoint, the hub (config.json only), or the tiny random model."""

    from cogbatch.config import TINY_PREFIX

    if job.model.startswith(TINY_PREFIX):
        from cogbatch.worker import tiny_model_dir

        return CogVLMConfig.from_json(tiny_model_dir(job))
    from cogbatch.model.weights import resolve_checkpoint

    try:  # the same resolution and messages as `cogbatch run` (a hub id: its config.json only)
        return CogVLMConfig.from_json(resolve_checkpoint(job.model, ("config.json",)))
    except ConfigError as e:
        raise ConfigError(f"model: {job.model}: {e}") from None

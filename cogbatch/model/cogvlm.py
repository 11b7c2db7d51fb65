"""`CogVLM`: the whole model (both generations) and the small API the pipeline and tests use.

Adapted from THUDM's `modeling_cogvlm.py` (cogvlm-chat-hf, cogvlm2-llama3-chat-19B): `CogVLMModel` is the
reference's module of that name (embeddings, decoder, vision tower: `model.*` in the checkpoint) and
`CogVLM` its `CogVLMForCausalLM` (plus `lm_head`), without the remote code's generation machinery.

    model = CogVLM.from_pretrained("THUDM/cogvlm2-llama3-chat-19B", dtype=torch.bfloat16, device="cuda")
    sample = model.build_inputs(None, "Describe this image.", image=pil_image, template="chat")
    out = model.generate(model.collate([sample]), GenerationConfig(max_new_tokens=128))
    out.texts[0], out.finish_reasons[0]

    model.logits(input_ids, token_type_ids, attention_mask, images)  # (B, L, V) float32

Weights are assigned tensor by tensor from the safetensors shards into a model built on the meta
device, so the full-precision model is never held twice.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.errors import CheckpointError
from cogbatch.model.generate import GenerationOutput, generate
from cogbatch.model.kvcache import KVCache
from cogbatch.model.language import (
    VISION,
    DecoderLayer,
    PassInputs,
    RMSNorm,
    attention_bias,
    padding_invariant_position_ids,
    vision_expert_mask,
)
from cogbatch.model.preprocess import preprocess_image
from cogbatch.model.prompts import BatchInputs, PromptInputs, build_inputs, collate
from cogbatch.model.quant.plan import describe_int4_kernel
from cogbatch.model.settings import DTYPE_NAMES, GenerationConfig, torch_dtype
from cogbatch.model.vision import VisionTower
from cogbatch.model.weights import (
    DERIVED_SUFFIXES,
    check_tensors,
    has_tokenizer,
    load_tokenizer,
    resolve_checkpoint,
    scan_tensors,
    stream_tensors,
    weight_files,
)

log = logging.getLogger("cogbatch.model")

# cogvlm-chat-hf ships no tokenizer: the official demo loads vicuna's.
_DEFAULT_TOKENIZER = {"cogvlm1": "lmsys/vicuna-7b-v1.5"}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on GPUs of compute capability >= 8.0 (Ampere on), fp16 on older GPUs, fp32 on CPU.

    Decided by the capability, not `torch.cuda.is_bf16_supported()`: that is True on sm75 (2080 Ti)
    and sm61 (1080 Ti) as well, where bf16 is emulated, slow, and gets no fused int4 kernel.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return _auto_cuda_dtype(device)
        return torch.float32
    try:
        return torch_dtype(dtype)
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPE_NAMES)}") from None


def _auto_cuda_dtype(device: torch.device) -> torch.dtype:
    major, minor = torch.cuda.get_device_capability(device)
    chosen = torch.bfloat16 if major >= 8 else torch.float16
    if (str(device), major, minor) not in _logged_choices:  # once per device, not per fingerprint
        _logged_choices.add((str(device), major, minor))
        kernel, _ = describe_int4_kernel(device, chosen, 128)
        why = "native bf16" if major >= 8 else "no native bf16 before sm80"
        slow = "; fp16 math is slow before sm70 (dtype: fp32 trades memory for speed)" if major < 7 else ""
        log.info("%s compute capability %d.%d: dtype auto -> %s (%s%s); int4 group 128: %s",
                 device, major, minor, str(chosen).removeprefix("torch."), why, slow, kernel)  # fmt: skip
    return chosen


_logged_choices: set[tuple[str, int, int]] = set()


class CogVLMModel(nn.Module):
    """Embeddings, decoder layers, final norm and the vision tower (`model.*` in the checkpoint)."""

    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.vision = VisionTower(cfg)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, image_features: torch.Tensor | None):
        """Token embeddings with image features written into the image slots, row-major over the batch."""
        x = self.embed_tokens(input_ids)  # (B, L, D)
        slots = token_type_ids == VISION
        n_slots = int(slots.sum())
        if image_features is None:
            if n_slots:
                raise ValueError(f"input has {n_slots} image positions but no images were given")
            return x
        feats = image_features.reshape(-1, x.shape[-1]).to(x.dtype)  # (n_img * n_vis, D)
        if feats.shape[0] != n_slots:
            raise ValueError(f"{feats.shape[0]} image feature rows for {n_slots} image positions")
        x[slots] = feats
        return x

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder over (B, L, D) embeddings; `attention_mask` covers cached + new tokens (B, T).

        `attn_bias` replaces the mask built from `attention_mask` (slot caches build their own).
        The caller advances the cache afterwards: only it knows how many of the L tokens are real.
        """
        L = inputs_embeds.shape[1]
        vision_mask = vision_expert_mask(token_type_ids) if L > 1 else None
        if vision_mask is not None and not bool(vision_mask.any()):
            vision_mask = None
        if attn_bias is None:
            past = cache.length if cache is not None else 0
            attn_bias = attention_bias(attention_mask, L, past, inputs_embeds.dtype)
        pass_in = PassInputs(vision_mask, position_ids, attn_bias, cache)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, pass_in)
        return self.norm(x)


class CogVLM(nn.Module):
    """The whole model: `CogVLMModel` and the `lm_head`, loaded from an official checkpoint."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tokenizer: Any = None
        self.load_report: Any = None  # set by from_pretrained (cogbatch.model.quant.report.LoadReport)
        # How generation caches keys and values: "none" (the model's dtype) or "int8" (half the memory,
        # slightly different outputs); from `quantization.kv_cache`, or set directly before generating.
        self.kv_cache = "none"

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def vision_tower(self) -> VisionTower:
        """The vision phase's part of the model (`model.vision.*`)."""
        return self.model.vision

    def language_parts(self) -> list[nn.Module]:
        """What the language phase runs: `lm_head`, the token embeddings, the decoder layers, the final norm."""
        return [self.lm_head, *(m for name, m in self.model.named_children() if name != "vision")]

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        quantization: Any = None,
        tokenizer: str | Path | None = None,
        cache_dir: str | Path | bool | None = None,
        dequant_threshold: Any = None,
        verify_cache: bool = False,
        wait_for_cache: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
        park_vision: bool = False,
    ) -> CogVLM:
        """Load an official checkpoint (local directory, hub id or `tiny-random:<arch>`) with our implementation.

        `tiny-random:cogvlm2` (or `:cogvlm`) names a small random model, built once under the cache
        directory (`model.sources`; for smoke runs: its text is meaningless).
        `tokenizer` names a tokenizer to use when the checkpoint has none (cogvlm-chat-hf).
        `quantization`: None/"none", "int4" (group 128), "int4-g32"/"-g64"/"-g128", "int8", or a
        dict / `QuantConfig` with per-module rules (see `cogbatch.model.quant.spec`); its `kv_cache`
        ("int8": an 8-bit KV cache) becomes `model.kv_cache`, whatever the weights. Quantized loads
        stream the checkpoint layer by layer and use the quantized-weights cache under `cache_dir`
        (default `$COGBATCH_CACHE_DIR`, else `~/.cache/cogbatch`; False disables it).
        `dequant_threshold`: rows above which a quantized layer uses a transient dense weight
        (None = the device's default, `math.inf` = never, or a dict per device type).
        `verify_cache`: check the checksum of every cached tensor (by default only an entry's first use does).
        `wait_for_cache`: return only once a new cache entry is written (by default, on CPU, it is written
        in the background while the model is used; a GPU load always waits for it).
        `progress(what, bytes done, bytes total)` is called as weights are read, `what` naming the
        source ("checkpoint", or "quantized-weights cache"): a caller's progress bar over the minutes a
        large load takes.
        `park_vision`: the vision tower is made for `device` (a quantized weight packed for its kernel
        there) but kept in host memory, so that a phase-swapped run never holds both parts, even while
        loading; the run's first vision phase brings it over.
        The load report is `model.load_report`.
        """
        from cogbatch.model.quant.report import LoadTracker, build_report
        from cogbatch.model.quant.spec import QuantConfig

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        host_prefix = "model.vision." if park_vision and device.type != "cpu" else None
        dtype = resolve_dtype(dtype, device)
        full = QuantConfig.read(quantization)
        quant = None if full is None else full.effective()
        ckpt = resolve_checkpoint(path_or_id, cache_dir=Path(cache_dir) if isinstance(cache_dir, str | Path) else None)
        cfg = CogVLMConfig.from_json(ckpt)
        files = weight_files(ckpt)
        found = scan_tensors(files)
        check_tensors(checkpoint_tensor_shapes(cfg), found, ckpt)

        # Imported here, not at the top (an unquantized load need not pay optimum-quanto's ~4 s), and
        # before the tracker starts: the load report times the load, not library imports. torch imports
        # torch._dynamo (~1.4 s) on the first module built on the meta device; quanto imports it too.
        importlib.import_module("torch._dynamo")
        if quant is None:
            import accelerate  # noqa: F401
        else:
            from cogbatch.model.quant.loader import load_quantized

        cache: dict[str, Any] = {}
        with LoadTracker(device, progress=progress) as tracker:
            if quant is None:
                model = cls._load_unquantized(cfg, files, dtype, device, tracker, host_prefix)
            else:
                model, cache = load_quantized(
                    cls, cfg, ckpt, files, list(found), quant=quant, dtype=dtype, device=device,
                    cache_dir=cache_dir, dequant_threshold=dequant_threshold, tracker=tracker,
                    verify_cache=verify_cache, wait_for_cache=wait_for_cache,
                    host_prefix=host_prefix,
                )  # fmt: skip
            model.eval().requires_grad_(False)
        model.kv_cache = "none" if full is None else full.kv_cache
        model.load_report = build_report(model, tracker, checkpoint=ckpt, dtype=dtype, quant=quant, **cache)
        log.info("%s", model.load_report.summary())
        if model.kv_cache != "none":
            log.info("KV cache: %s (keys and values rounded per head and token; ~0.5x the %s cache)",
                     model.kv_cache, str(dtype).removeprefix("torch."))  # fmt: skip
        model.tokenizer = _load_tokenizer_for(ckpt, cfg, tokenizer)
        return model

    @classmethod
    def _load_unquantized(
        cls,
        cfg: CogVLMConfig,
        files: list[Path],
        dtype: torch.dtype,
        device: torch.device,
        tracker: Any,
        host_prefix: str | None = None,
    ) -> CogVLM:
        """Assign every tensor, cast to `dtype`, into a model built on meta: never two full copies."""
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device

        with init_empty_weights():  # parameters on meta; buffers (rotary) stay real
            model = cls(cfg)
        tracker.reading("checkpoint", sum(f.stat().st_size for f in files))
        with tracker.phase("read"):
            for name, tensor in stream_tensors(files, device):
                if not name.endswith(DERIVED_SUFFIXES):
                    host = host_prefix is not None and name.startswith(host_prefix)
                    target = torch.device("cpu") if host else device
                    set_module_tensor_to_device(model, name, target, value=tensor.to(target), dtype=dtype)
                tracker.read(tensor.numel() * tensor.element_size())
            if host_prefix is None:
                model.to(device)  # the rotary buffers
            else:  # the buffers alone: `model.to` would bring the parked tower back
                for m in model.modules():
                    for key, buf in m._buffers.items():
                        if buf is not None and buf.device != device:
                            m._buffers[key] = buf.to(device)
        return model

    # -- inputs ---------------------------------------------------------------------------------
    def preprocess(self, image: Any) -> torch.Tensor:
        """PIL image -> (3, S, S) float32 pixels, the reference transform."""
        return preprocess_image(image, self.config.vision.image_size)

    def build_inputs(
        self,
        tokenizer: Any,
        query: str,
        image: Any = None,
        template: str | None = None,
        history: Sequence[tuple[str, str]] = (),
    ) -> PromptInputs:
        """One sample's ids and types; `image` is a PIL image or a preprocessed tensor; tokenizer None = ours."""
        if image is not None and not isinstance(image, torch.Tensor):
            image = self.preprocess(image)
        return build_inputs(tokenizer or self.tokenizer, self.config, query, image, template, history)

    def collate(self, samples: Sequence[PromptInputs]) -> BatchInputs:
        return collate(samples, self.config.pad_token_id)

    # -- compute --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) pixels -> (n, n_vis, D) features for the image slots.

        Runs wherever the vision tower is, which is not the language model's device while a
        phase-swapped pipeline has moved the language model off the GPU.
        """
        device = self.model.vision.boi.device
        return self.model.vision(images.to(device, self.dtype))

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Full-sequence logits (B, L, V) in float32 for a left- or un-padded batch, in one pass.

        With an int8 KV cache (`kv_cache`) the pass reads its keys and values through one, so that the
        logits are those generation computes (it rounds every key before attention reads it).

        `image_features` (from `encode_images`) stand in for `images` when the vision tower ran
        elsewhere (phase swapping). `last` keeps only the last `last` positions (B, last, V): scoring a
        continuation needs those, not V logits for each of CogVLM2's 2,306 image positions.
        """
        if last is not None and last < 1:
            raise ValueError(f"last must be at least 1, got {last}")
        dev = self.device
        input_ids, token_type_ids, attention_mask = input_ids.to(dev), token_type_ids.to(dev), attention_mask.to(dev)
        feats = image_features
        if feats is None and images is not None:
            feats = self.encode_images(images)
        if position_ids is None:
            position_ids = padding_invariant_position_ids(token_type_ids, attention_mask)
        embeds = self.model.embed(input_ids, token_type_ids, feats)
        cache = None
        if self.kv_cache != "none":  # keys and values rounded as generation stores them: the logits it picks from
            cache = KVCache(self.config, *input_ids.shape, embeds.dtype, dev, self.kv_cache)
        hidden = self.model(embeds, token_type_ids, position_ids.to(dev), attention_mask, cache)
        if last is not None:
            hidden = hidden[:, -last:]
        return self.lm_head(hidden).float()

    def generate(
        self,
        batch_inputs: BatchInputs,
        generation_config: GenerationConfig | None = None,
        *,
        image_features: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> GenerationOutput:
        return generate(
            self, batch_inputs, generation_config or GenerationConfig(), self.tokenizer, image_features, return_logits
        )


def _load_tokenizer_for(ckpt: Path, cfg: CogVLMConfig, override: str | Path | None) -> Any:
    if override is not None:
        return load_tokenizer(override)
    if has_tokenizer(ckpt):
        return load_tokenizer(ckpt)
    default = _DEFAULT_TOKENIZER.get(cfg.generation)
    if default is None:
        raise CheckpointError(f"{ckpt} has no tokenizer files; name one with tokenizer=...")
    return load_tokenizer(default)

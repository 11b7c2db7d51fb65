"""Model configuration for both CogVLM generations, read from the checkpoint's own `config.json`.

Adapted from THUDM's `configuration_cogvlm.py` (cogvlm-chat-hf, cogvlm2-llama3-chat-19B), whose keys
it reads; the constants the reference's `modeling_cogvlm.py` hard-codes are named here.

The official checkpoints ship a `config.json` for remote code we never execute, so this module
reads the same keys into a plain dataclass. The generation is recognised from the keys themselves:
only CogVLM2 has `num_multi_query_heads` (grouped-query attention), and with it come the Llama-3
rotary base and the 2x2 convolution that quarters the number of image tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cogbatch.model.errors import ConfigError

Generation = Literal["cogvlm1", "cogvlm2"]

# Rotary bases are not stored in the official configs: the reference code hard-codes them.
_DEFAULT_ROPE_THETA = {"cogvlm1": 10_000.0, "cogvlm2": 500_000.0}
# CogVLM2's reference hard-codes `<|reserved_special_token_0|>` as pad and image placeholder.
COGVLM2_PLACEHOLDER_ID = 128_002
_ARCHITECTURE = "CogVLMForCausalLM"


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    num_positions: int
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def grid(self) -> int:
        """Patches per side before any downsampling (490/14 = 35, 1344/14 = 96)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class CogVLMConfig:
    generation: Generation
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    vision: VisionConfig
    template_version: str = "chat"
    max_position_embeddings: int = 2048
    torch_dtype: str = "bfloat16"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be divisible by num_attention_heads")
        elif self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be divisible by num_multi_query_heads")
        v = self.vision
        if v.image_size % v.patch_size:
            problems.append("vision_config.image_size must be divisible by vision_config.patch_size")
        if v.hidden_size % v.num_heads:
            problems.append("vision_config.hidden_size must be divisible by vision_config.num_heads")
        if v.num_positions != v.grid**2 + 1:
            problems.append(f"vision_config.num_positions must be (image_size/patch_size)^2 + 1 = {v.grid**2 + 1}")
        if self.downsample and v.grid % 2:
            problems.append("CogVLM2 needs an even number of patches per side (2x2 convolution)")
        if not 0 <= self.pad_token_id < self.vocab_size:
            problems.append("pad_token_id must be a valid token id")
        if not 0 <= self.image_placeholder_id < self.vocab_size:
            problems.append(f"vocab_size must exceed the image placeholder id {self.image_placeholder_id}")
        if problems:
            raise ConfigError("; ".join(problems))

    # Derived sizes. The comments give the real checkpoints' values.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads  # 128 for both

    @property
    def qkv_out_features(self) -> int:
        """Rows of the fused QKV projection: 3*4096 (CogVLM), 4096 + 2*8*128 = 6144 (CogVLM2)."""
        return self.hidden_size + 2 * self.num_key_value_heads * self.head_dim

    @property
    def downsample(self) -> bool:
        """CogVLM2 halves the patch grid with a 2x2 stride-2 convolution before the GLU adapter."""
        return self.generation == "cogvlm2"

    @property
    def image_grid(self) -> int:
        """Image tokens per side entering the language model: 35 (CogVLM), 48 (CogVLM2)."""
        return self.vision.grid // 2 if self.downsample else self.vision.grid

    @property
    def vision_tokens(self) -> int:
        """Sequence positions one image occupies, boi and eoi included: 1227 (CogVLM), 2306 (CogVLM2)."""
        return self.image_grid**2 + 2

    @property
    def image_placeholder_id(self) -> int:
        """Token id written at image positions (never embedded; features overwrite them).

        The reference uses the tokenizer's pad id for CogVLM (vicuna `<unk>` = 0, the config's
        `pad_token_id`) and a hard-coded 128002 for CogVLM2, whatever its config says.
        """
        return COGVLM2_PLACEHOLDER_ID if self.generation == "cogvlm2" else self.pad_token_id

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CogVLMConfig:
        _reject_unsupported(d)
        try:
            generation: Generation = "cogvlm2" if "num_multi_query_heads" in d else "cogvlm1"
            vd = d["vision_config"]
            vision = VisionConfig(
                hidden_size=int(vd["hidden_size"]),
                intermediate_size=int(vd["intermediate_size"]),
                num_heads=int(vd["num_heads"]),
                num_hidden_layers=int(vd["num_hidden_layers"]),
                image_size=int(vd["image_size"]),
                patch_size=int(vd["patch_size"]),
                num_positions=int(vd["num_positions"]),
                in_channels=int(vd.get("in_channels", 3)),
                layer_norm_eps=float(vd.get("layer_norm_eps", 1e-6)),
                hidden_act=str(vd.get("hidden_act", "gelu")),
            )
            eos = d.get("eos_token_id", 2)
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            heads = int(d["num_attention_heads"])
            return cls(
                generation=generation,
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_multi_query_heads", heads)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if generation == "cogvlm1" else 1e-5)),
                rope_theta=float(d.get("rope_theta", _DEFAULT_ROPE_THETA[generation])),
                bos_token_id=int(d.get("bos_token_id", 1)),
                eos_token_ids=eos_ids,
                pad_token_id=int(d.get("pad_token_id", COGVLM2_PLACEHOLDER_ID if generation == "cogvlm2" else 0)),
                vision=vision,
                template_version=str(d.get("template_version", "chat")),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                torch_dtype=str(d.get("torch_dtype", "bfloat16")),
                raw=dict(d),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json has a value of the wrong type: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> CogVLMConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _reject_unsupported(d: dict[str, Any]) -> None:
    """Refuse relatives of CogVLM that this implementation would load but compute wrongly.

    CogAgent adds a cross-attention high-resolution tower (`cross_*` keys), CogVLM2-Video another
    architecture class; both share enough keys with CogVLM to pass a shape check.
    """
    archs = d.get("architectures") or [_ARCHITECTURE]
    if _ARCHITECTURE not in archs:
        raise ConfigError(f"architecture {', '.join(map(str, archs))} is not supported (only {_ARCHITECTURE})")
    cross = sorted(k for k in d if k.startswith("cross_"))
    if cross:
        raise ConfigError(f"CogAgent-style checkpoints ({', '.join(cross)}) are not supported")
    vision = d.get("vision_config")
    vision_act = vision.get("hidden_act", "gelu") if isinstance(vision, dict) else "gelu"
    acts = {"hidden_act": (d.get("hidden_act", "silu"), "silu"), "vision_config.hidden_act": (vision_act, "gelu")}
    for key, (value, supported) in acts.items():
        if value != supported:
            raise ConfigError(f"{key} {value!r} is not supported (CogVLM uses {supported!r})")


def checkpoint_tensor_shapes(cfg: CogVLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint with its shape, in the reference's own names.

    Used to validate a checkpoint before any weight is read, to write tiny checkpoints in the
    official layout, and to predict weight bytes without building a model.
    """
    D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size  # noqa: E741
    v = cfg.vision
    Dv, Iv = v.hidden_size, v.intermediate_size
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "self_attn.rotary_emb.inv_freq"] = (cfg.head_dim // 2,)
        for expert in ("vision", "language"):
            s[p + f"self_attn.{expert}_expert_query_key_value.weight"] = (cfg.qkv_out_features, D)
            if expert == "vision" and cfg.generation == "cogvlm2":
                s[p + "self_attn.vision_expert_query_key_value.bias"] = (cfg.qkv_out_features,)
            s[p + f"self_attn.{expert}_expert_dense.weight"] = (D, D)
        for expert in ("language", "vision"):
            s[p + f"mlp.{expert}_mlp.gate_proj.weight"] = (I, D)
            s[p + f"mlp.{expert}_mlp.up_proj.weight"] = (I, D)
            s[p + f"mlp.{expert}_mlp.down_proj.weight"] = (D, I)
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
    s["model.norm.weight"] = (D,)
    vp = "model.vision."
    s[vp + "boi"] = (1, 1, D)
    s[vp + "eoi"] = (1, 1, D)
    s[vp + "patch_embedding.cls_embedding"] = (1, Dv)
    s[vp + "patch_embedding.proj.weight"] = (Dv, v.in_channels, v.patch_size, v.patch_size)
    s[vp + "patch_embedding.proj.bias"] = (Dv,)
    s[vp + "patch_embedding.position_embedding.weight"] = (v.num_positions, Dv)
    for j in range(v.num_hidden_layers):
        p = f"{vp}transformer.layers.{j}."
        s[p + "input_layernorm.weight"] = (Dv,)
        s[p + "input_layernorm.bias"] = (Dv,)
        s[p + "attention.query_key_value.weight"] = (3 * Dv, Dv)
        s[p + "attention.query_key_value.bias"] = (3 * Dv,)
        s[p + "attention.dense.weight"] = (Dv, Dv)
        s[p + "attention.dense.bias"] = (Dv,)
        s[p + "mlp.fc1.weight"] = (Iv, Dv)
        s[p + "mlp.fc1.bias"] = (Iv,)
        s[p + "mlp.fc2.weight"] = (Dv, Iv)
        s[p + "mlp.fc2.bias"] = (Dv,)
        s[p + "post_attention_layernorm.weight"] = (Dv,)
        s[p + "post_attention_layernorm.bias"] = (Dv,)
    s[vp + "linear_proj.linear_proj.weight"] = (D, Dv)
    s[vp + "linear_proj.norm1.weight"] = (D,)
    s[vp + "linear_proj.norm1.bias"] = (D,)
    s[vp + "linear_proj.dense_h_to_4h.weight"] = (I, D)
    s[vp + "linear_proj.gate_proj.weight"] = (I, D)
    s[vp + "linear_proj.dense_4h_to_h.weight"] = (D, I)
    if cfg.downsample:
        s[vp + "conv.weight"] = (Dv, Dv, 2, 2)
        s[vp + "conv.bias"] = (Dv,)
    s["lm_head.weight"] = (V, D)
    return s

"""The decoder layers with visual experts: a Llama decoder whose every layer has two sets of weights.

Adapted from THUDM's `modeling_cogvlm.py` (cogvlm-chat-hf and cogvlm2-llama3-chat-19B): image tokens
(token type 1) go through the vision expert's QKV / dense / MLP, text tokens through the language
expert's; both attend to each other in one causal attention. Names follow the official checkpoints
(`model.layers.{i}.self_attn.vision_expert_query_key_value`, ...); the whole model is `cogvlm.CogVLM`.

Shapes: B batch, L new tokens, T cached + new tokens, H query heads, Hkv key/value heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cogbatch.model.config import CogVLMConfig
from cogbatch.model.kvcache import KVCache

LANGUAGE, VISION = 0, 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in fp32 whatever the activation dtype: fp16 squares overflow at |x| > 256.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Tokens routed to the vision expert: a token is VISION *and* so is the next one.

    So boi and the patches use the vision expert, eoi and all text use the language expert. A
    single-token decode step is always language.
    """
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    mask[:, :-1] = (token_type_ids[:, :-1] == VISION) & (token_type_ids[:, 1:] == VISION)
    return mask


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions exactly as the reference computes them.

    bos = 0, boi = 1, every patch shares position 2, eoi = 3, text continues 4, 5, ...; padding
    positions add nothing (left pads are 0 and push bos to 1, right pads repeat the last position).
    """
    tmp = token_type_ids.clone()
    tmp[attention_mask == 0] = -1
    is_boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
    is_boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION) & (tmp[:, :-1] == LANGUAGE)  # first token of a vision run
    is_boi_eoi[:, 0] |= tmp[:, 0] == VISION
    is_boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION) & (tmp[:, 1:] == LANGUAGE)  # last token of a vision run
    is_boi_eoi[:, -1] |= tmp[:, -1] == VISION
    tmp[is_boi_eoi] = LANGUAGE
    y = torch.zeros_like(tmp)
    y[:, 1:] = (tmp[:, 1:] == LANGUAGE) | ((tmp[:, 1:] == VISION) & (tmp[:, :-1] == LANGUAGE))
    return y.cumsum(-1)


def padding_invariant_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference positions, shifted so that each sample's first real token is at 0.

    With left padding the reference starts a sample at 1 instead of 0. Rotary attention only sees
    position differences, so the shift is harmless in exact arithmetic, but removing it makes a
    padded sample compute with the very same numbers as when it runs alone.
    """
    pos = build_position_ids(token_type_ids, attention_mask)
    first_real = attention_mask.long().argmax(-1, keepdim=True)  # index of the first non-pad token
    return (pos - pos.gather(1, first_real)).clamp_min(0)


class RotaryEmbedding(nn.Module):
    """GPT-NeoX style (rotate-half, not interleaved) rotary embedding over the full head dim."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponent)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute `inv_freq` after the module was built on the meta device."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed in fp32 from integer positions: bf16 positions would round above 256.
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # (B, L, hd/2)
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (B, 1, L, hd)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


@dataclass
class PassInputs:
    """What every decoder layer of one forward pass reads besides its hidden states (built once per pass)."""

    vision_mask: torch.Tensor | None  # (B, L) tokens routed to the vision expert; None: all language
    position_ids: torch.Tensor  # (B, L) rotary positions
    attn_bias: torch.Tensor | None  # (B, 1, L, T) additive mask; None: SDPA's plain causal path
    cache: KVCache | None  # where each layer stores and reads its keys and values


def _route(x: torch.Tensor, vision_mask: torch.Tensor | None, vision: nn.Module, language: nn.Module) -> torch.Tensor:
    """Apply `vision` to the tokens of `vision_mask` and `language` to the others."""
    if vision_mask is None:  # text-only input or a decode step: skip the gather / scatter
        return language(x)
    text = language(x[~vision_mask])  # (n_text, out)
    out = text.new_empty(*x.shape[:-1], text.shape[-1])
    out[~vision_mask] = text
    out[vision_mask] = vision(x[vision_mask])
    return out


class ExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        self.language_mlp = ExpertMLP(cfg.hidden_size, cfg.intermediate_size)
        self.vision_mlp = ExpertMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor | None) -> torch.Tensor:
        return _route(x, vision_mask, self.vision_mlp, self.language_mlp)


class VisionExpertAttention(nn.Module):
    def __init__(self, cfg: CogVLMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which of the cache's layers this one's keys and values are
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        # CogVLM2's vision expert QKV has a bias; CogVLM's has none; the language experts never do.
        self.vision_expert_query_key_value = nn.Linear(
            cfg.hidden_size, cfg.qkv_out_features, bias=cfg.generation == "cogvlm2"
        )
        self.vision_expert_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.language_expert_query_key_value = nn.Linear(cfg.hidden_size, cfg.qkv_out_features, bias=False)
        self.language_expert_dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, pass_in: PassInputs) -> torch.Tensor:
        B, L, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        vision_mask, attn_mask = pass_in.vision_mask, pass_in.attn_bias
        qkv = _route(x, vision_mask, self.vision_expert_query_key_value, self.language_expert_query_key_value)
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, L, Hkv, hd).transpose(1, 2)  # (B, Hkv, L, hd)
        v = v.view(B, L, Hkv, hd).transpose(1, 2)  # (B, Hkv, L, hd)
        cos, sin = self.rotary_emb(pass_in.position_ids)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if pass_in.cache is not None:
            k, v = pass_in.cache.update(self.layer_idx, k, v)  # (B, Hkv, T, hd)
        if attn_mask is not None and Hkv != H:
            out = _grouped_attention(q, k, v, attn_mask)
        else:
            # GQA: query head h reads kv head h // (H / Hkv); flash does it without copying the cache.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and L > 1, enable_gqa=Hkv != H
            )
        out = out.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, D)
        return _route(out, vision_mask, self.vision_expert_dense, self.language_expert_dense)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention with grouped KV heads, as plain attention per KV head.

    With a mask, SDPA's flash kernel is out and its memory-efficient kernel refuses grouped KV heads:
    the math kernel would copy the whole cache to all query heads in every layer and step (for
    CogVLM2 at 4 slots and 2.6 k keys, 170 MB per layer). The query heads that share a KV head are
    stacked as extra query rows instead (h = kv * G + g -> row g * L + l), which the fused
    kernel takes with the mask; the result is the same attention.
    """
    B, H, L, hd = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    mask = mask.repeat(1, 1, G, 1) if L > 1 and mask.shape[2] > 1 else mask  # row g * L + l sees row l's keys
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G * L, hd), k, v, attn_mask=mask)
    return out.reshape(B, H, L, hd)  # CUDA's fused kernels return (B, rows, heads, hd) memory: not always a view


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CogVLMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.self_attn = VisionExpertAttention(cfg, layer_idx)
        self.mlp = VisionExpertMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, pass_in: PassInputs) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), pass_in)
        return h + self.mlp(self.post_attention_layernorm(h), pass_in.vision_mask)


def attention_bias(
    attention_mask: torch.Tensor, query_len: int, past_len: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive (B, 1, L, T) mask: causal plus key padding, or None when plain causal suffices.

    Masked entries get `finfo.min`, not -inf: a left pad's query row may be fully masked, and a
    finite row keeps its softmax finite (a NaN there would leak into real tokens through 0 * NaN).
    """
    if bool(attention_mask.all()):
        if past_len == 0:
            return None  # SDPA's is_causal path (flash / memory-efficient kernels on GPU)
        if query_len == 1:
            return None  # one new token may see the whole cache
    T = past_len + query_len
    device = attention_mask.device
    q_pos = torch.arange(past_len, T, device=device).view(-1, 1)
    k_pos = torch.arange(T, device=device).view(1, -1)
    allowed = (k_pos <= q_pos).unsqueeze(0) & attention_mask[:, None, :T].bool()  # (B, L, T)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.unsqueeze(1)

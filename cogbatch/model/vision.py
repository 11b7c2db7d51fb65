"""EVA2-CLIP-E vision tower and the GLU adapter that maps its output into the language model.

Adapted from THUDM's `visual.py` (cogvlm-chat-hf and cogvlm2-llama3-chat-19B; CogVLM2 adds the 2x2 conv).

Module and parameter names follow the official checkpoints (`model.vision.*`) so that weights load
by name. Attention uses `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU,
the math kernel on CPU) instead of the reference's xformers call: same formula, no extra dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cogbatch.model.config import CogVLMConfig, VisionConfig


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_embedding = nn.Parameter(torch.empty(1, cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, G*G, Dv), row-major over (h, w)
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)  # (B, 1, Dv)
        x = torch.cat([cls, x], dim=1)  # (B, G*G + 1, Dv)
        return x + self.position_embedding.weight.unsqueeze(0)


class Attention(nn.Module):
    """Bidirectional multi-head attention over all patches (no mask, no rotary)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.query_key_value(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, hd)
        return self.dense(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the reference


class TransformerLayer(nn.Module):
    """EVA2-CLIP block. Despite their names both norms are applied to the sub-layer *output* (post-norm)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """Adapter from the vision width to the language width: projection, LayerNorm+GELU, SwiGLU."""

    def __init__(self, in_features: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(in_features, hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(hidden_size)  # default eps 1e-5: the reference does not read it from config
        self.dense_h_to_4h = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class VisionTower(nn.Module):
    """Pixels (B, 3, S, S) -> image token features (B, n_vis, D) ready to replace the image slots.

    `forward` returns `[boi, GLU(patches)..., eoi]`; `stages` also returns the intermediate tensors
    the reference parity tests compare.
    """

    def __init__(self, cfg: CogVLMConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = Transformer(v)
        self.linear_proj = GLU(v.hidden_size, cfg.hidden_size, cfg.intermediate_size)
        # CogVLM2 only: 2x2 stride-2 conv, 96x96 patches -> 48x48 tokens at 1344 px.
        self.conv = nn.Conv2d(v.hidden_size, v.hidden_size, kernel_size=2, stride=2) if cfg.downsample else None
        self.boi = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))

    def stages(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embedded = self.patch_embedding(images)  # (B, G*G + 1, Dv)
        vit = self.transformer(embedded)  # (B, G*G + 1, Dv)
        x = vit[:, 1:]  # drop cls
        if self.conv is not None:
            B, N, Dv = x.shape
            g = int(N**0.5)
            x = x.view(B, g, g, Dv).permute(0, 3, 1, 2)  # (B, Dv, G, G)
            x = self.conv(x).flatten(2).transpose(1, 2)  # (B, G/2 * G/2, Dv)
        glu_in = x.contiguous()  # a strided view here; fused int4 kernels need contiguous input
        y = self.linear_proj(glu_in)  # (B, n_patches, D)
        B = y.shape[0]
        out = torch.cat([self.boi.expand(B, -1, -1), y, self.eoi.expand(B, -1, -1)], dim=1)  # (B, n_vis, D)
        return {"patch_embedding_out": embedded, "vit_out": vit, "glu_in": glu_in, "vision_out": out}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)["vision_out"]

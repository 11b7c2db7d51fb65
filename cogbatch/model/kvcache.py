"""Preallocated keys and values of every decoder layer: one cache, and its per-sequence ("slot") variant.

Adapted from the KV handling of THUDM's `modeling_cogvlm.py` (cogvlm-chat-hf, cogvlm2-llama3-chat-19B),
with gpt-fast's preallocated layout: keys and values live in (B, Hkv, T_max, hd) buffers, un-expanded for
GQA (SDPA's `enable_gqa` reads them as they are), written in place as tokens are computed.

An 8-bit cache (`kv_dtype="int8"`) halves that memory, which decides how many sequences decode at once
on a small card (CogVLM has no grouped KV heads: 0.5 MiB per token in 16-bit). Keys and values are
stored int8 with one scale per (sequence, KV head, token): symmetric absmax / 127 over the head
dimension, as LMDeploy's KV int8 does, the scale kept in the model's dtype and used as stored (rounded)
to quantize. Attention reads one layer at a time, dequantized into the model's dtype: that transient
of one layer is what the memory planner counts. Every buffer of a layer, scales included, has the
(B, Hkv, T, ·) layout, so moving, dropping and loading rows treats them all alike (`planes`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cogbatch.model.config import CogVLMConfig
from cogbatch.model.quant.spec import KV_CACHE_DTYPES


def quantize_int8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, `dtype` scales (..., 1)) of `x` (..., hd): absmax / 127 per vector over the last dim.

    Divided by the scale as stored (rounded to `dtype`), so that dequantizing with it is off by at most
    half a step; a vector of zeros gets a zero scale and zeros.
    """
    scale = (x.detach().abs().amax(-1, keepdim=True).float() / 127).to(dtype)
    step = scale.float()
    q = (x.float() / torch.where(step > 0, step, 1.0)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Values in the scale's dtype."""
    return q.to(scale.dtype) * scale


class KVCache:
    """Every row at the same length: `generate()`'s left-padded batches and the image prefix prefill.

    The layers of one forward pass all write at `[length, length + L)`; the caller advances the length
    afterwards (only it knows how many of the L tokens are real).
    """

    def __init__(
        self,
        cfg: CogVLMConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: str = "none",
        fill: Callable[..., torch.Tensor] = torch.empty,
    ) -> None:
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        self.dtype, self.kv_dtype = dtype, kv_dtype
        quantized = kv_dtype == "int8"
        layers = range(cfg.num_hidden_layers)
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        store = torch.int8 if quantized else dtype
        self.k = [fill(shape, dtype=store, device=device) for _ in layers]
        self.v = [fill(shape, dtype=store, device=device) for _ in layers]
        # Scales (B, Hkv, T, 1) beside int8 keys and values; zeros, so that unwritten tokens read as 0.
        scale_shape = (*shape[:3], 1)
        self.k_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in layers] if quantized else None
        self.v_scale = [torch.zeros(scale_shape, dtype=dtype, device=device) for _ in layers] if quantized else None
        self.length = 0  # tokens stored (every row)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def planes(self) -> list[list[torch.Tensor]]:
        """Every buffer, per layer, in a fixed order: k, v, then (int8) their scales; all (B, Hkv, T, ·)."""
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.quantized else [])

    def _set_planes(self, planes: list[list[torch.Tensor]]) -> None:
        self.k, self.v = planes[0], planes[1]
        if self.quantized:
            self.k_scale, self.v_scale = planes[2], planes[3]

    def _check_room(self, end: int, what: str = "tokens") -> None:
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} {what}; {end} needed")

    def _write(self, layer: int, where: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values at index `where` of the layer's buffers (values' last dim: hd)."""
        if not self.quantized:
            self.k[layer][where] = k
            self.v[layer][where] = v
            return
        for data, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, scale = quantize_int8(x, self.dtype)
            data[layer][where] = q
            scales[layer][where] = scale

    def _read(self, layer: int, rows: slice, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` up to `end`, in the model's dtype (int8: a dequantized copy)."""
        k, v = self.k[layer][rows, :, :end], self.v[layer][rows, :, :end]
        if not self.quantized:
            return k, v
        return (
            dequantize_int8(k, self.k_scale[layer][rows, :, :end]),
            dequantize_int8(v, self.v_scale[layer][rows, :, :end]),
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new (B, Hkv, L, hd) keys and values; return all of them so far (B, Hkv, T, hd)."""
        end = self.length + k.shape[2]
        self._check_room(end)
        self._write(layer, (slice(None), slice(None), slice(self.length, end)), k, v)
        return self._read(layer, slice(None), end)

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences so that they stop costing memory bandwidth in decode."""
        self._set_planes([[t.index_select(0, rows) for t in plane] for plane in self.planes()])

    def nbytes(self) -> int:
        """Device bytes of every buffer."""
        return sum(t.numel() * t.element_size() for plane in self.planes() for t in plane)


class SlotKVCache(KVCache):
    """Per-sequence ("slot") lengths, for continuous batching.

    Each slot holds one sequence contiguously (its image prefix, its prompt, its output) with its
    own length, so a finished sequence's slot can take a new request while the others decode. A
    forward pass works on the contiguous slots `[start, start + B)` set by `select`; new keys and
    values are written at each slot's own length. Lengths grow only through `advance`, by each
    row's real (unpadded) token count.
    """

    def __init__(
        self,
        cfg: CogVLMConfig,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: str = "none",
    ) -> None:
        # Zeros, not `empty`: a shorter slot's attention spans keys past its own length (masked by
        # an additive -inf bias), and a weight of exactly 0 times uninitialised NaN/Inf is still NaN.
        super().__init__(cfg, slots, max_len, dtype, device, kv_dtype, fill=torch.zeros)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.start, self.stop = 0, slots

    def select(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = k.shape[2]
        lengths = self.lengths[self.start : self.stop]
        pos = lengths.unsqueeze(1) + torch.arange(L, device=k.device)  # (B, L) cache index per new token
        end = int(pos.max()) + 1
        self._check_room(end, "tokens per sequence")
        rows = torch.arange(self.start, self.stop, device=k.device).unsqueeze(1)  # (B, 1)
        # (B, L, Hkv, hd) scattered into (B, Hkv, T, hd)
        self._write(layer, (rows, slice(None), pos), k.transpose(1, 2), v.transpose(1, 2))
        return self._read(layer, slice(self.start, self.stop), end)

    def bias(self, query_len: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, L, T) additive mask: query i of a slot sees that slot's keys up to its own position."""
        lengths = self.lengths[self.start : self.stop]
        T = int(lengths.max()) + query_len
        q_pos = lengths.unsqueeze(1) + torch.arange(query_len, device=lengths.device)  # (B, L)
        k_pos = torch.arange(T, device=lengths.device)
        allowed = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # (B, L, T)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=lengths.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def advance(self, n: torch.Tensor | int) -> None:
        self.lengths[self.start : self.stop] += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (slots renumbered from 0); the decoder frees single slots with `move` instead."""
        super().keep(rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.start, self.stop = 0, len(rows)

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (to keep the active slots contiguous)."""
        n = int(self.lengths[src])
        for plane in self.planes():
            for t in plane:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = self.lengths[src]

    def load_prefix(self, slot: int, planes: list[list[torch.Tensor]]) -> None:
        """Start slot `slot` with a precomputed prefix: its `planes()` (as `Prefix.planes`), per layer (Hkv, P, ·)."""
        own = self.planes()
        if len(planes) != len(own) or planes[0][0].dtype != own[0][0].dtype:
            raise ValueError(f"a prefix stored {planes[0][0].dtype} in a {own[0][0].dtype} KV cache")
        P = planes[0][0].shape[1]
        for src, dst in zip(planes, own, strict=True):
            for layer, t in enumerate(src):
                dst[layer][slot, :, :P] = t
        self.lengths[slot] = P

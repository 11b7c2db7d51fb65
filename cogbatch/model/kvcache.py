"""Preallocated keys and values of every decoder layer: one cache, and its per-sequence ("slot") variant.

Adapted from the KV handling of THUDM's `modeling_cogvlm.py` (cogvlm-chat-hf, cogvlm2-llama3-chat-19B),
with gpt-fast's preallocated layout: keys and values live in (B, Hkv, T_max, hd) buffers, un-expanded for
GQA (SDPA's `enable_gqa` reads them as they are), written in place as tokens are computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cogbatch.model.config import CogVLMConfig


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
        fill: Callable[..., torch.Tensor] = torch.empty,
    ) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [fill(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [fill(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens stored (every row)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def _check_room(self, end: int, what: str = "tokens") -> None:
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} {what}; {end} needed")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new (B, Hkv, L, hd) keys and values; return all of them so far (B, Hkv, T, hd)."""
        end = self.length + k.shape[2]
        self._check_room(end)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences so that they stop costing memory bandwidth in decode."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class SlotKVCache(KVCache):
    """Per-sequence ("slot") lengths, for continuous batching.

    Each slot holds one sequence contiguously (its image prefix, its prompt, its output) with its
    own length, so a finished sequence's slot can take a new request while the others decode. A
    forward pass works on the contiguous slots `[start, start + B)` set by `select`; new keys and
    values are written at each slot's own length. Lengths grow only through `advance`, by each
    row's real (unpadded) token count.
    """

    def __init__(self, cfg: CogVLMConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        # Zeros, not `empty`: a shorter slot's attention spans keys past its own length (masked by
        # an additive -inf bias), and a weight of exactly 0 times uninitialised NaN/Inf is still NaN.
        super().__init__(cfg, slots, max_len, dtype, device, fill=torch.zeros)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.start, self.stop = 0, slots

    def select(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, L, _ = k.shape
        lengths = self.lengths[self.start : self.stop]
        pos = lengths.unsqueeze(1) + torch.arange(L, device=k.device)  # (B, L) cache index per new token
        end = int(pos.max()) + 1
        self._check_room(end, "tokens per sequence")
        rows = torch.arange(B, device=k.device).unsqueeze(1)  # (B, 1)
        kc, vc = self.k[layer][self.start : self.stop], self.v[layer][self.start : self.stop]
        kc[rows, :, pos] = k.transpose(1, 2)  # (B, L, Hkv, hd) scattered into (B, Hkv, T, hd)
        vc[rows, :, pos] = v.transpose(1, 2)
        return kc[:, :, :end], vc[:, :, :end]

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
        for kv in (self.k, self.v):
            for t in kv:
                t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = self.lengths[src]

    def load_prefix(self, slot: int, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Start slot `slot` with a precomputed prefix: per layer (Hkv, P, hd)."""
        P = k[0].shape[1]
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :P] = k[layer]
            self.v[layer][slot, :, :P] = v[layer]
        self.lengths[slot] = P

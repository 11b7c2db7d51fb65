"""Continuous batching over shared image prefixes: the pipeline's generation path.

A captioning job spends most of its compute on the image: CogVLM2 turns every image into 2,306
tokens before the first word of the prompt. Here each image is encoded once and its prefix
(`bos` + image tokens) run through the language model once; every prompt about that image starts
from a copy of that prefix's keys and values and only its own text is prefilled. Decoding keeps up
to `slots` sequences in flight; a sequence that finishes hands its slot to the next request.

    prefixes = encode_prefixes(model, pixels)                 # one vision pass per image
    engine = DecodeEngine(model, gen_cfg, slots=8, max_text=64)
    results = engine.run([EngineRequest(key, prefixes[i], text_ids) ...])

Greedy results equal those of `generate()` on the same request alone: the same positions, the same
expert routing, the same masks; only the order of floating-point sums differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cogbatch.model.generate import (
    GenerationConfig,
    Sequence,
    choose_tokens,
    decode_text,
    stop_ids_for,
)
from cogbatch.model.language import LANGUAGE, VISION, KVCache, SlotKVCache, build_position_ids

if TYPE_CHECKING:
    from cogbatch.model.cogvlm import CogVLM


@dataclass
class Prefix:
    """Keys and values of `[bos, boi, patches..., eoi]` for one image, per layer (Hkv, P, hd)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    next_position: int  # rotary position of the first text token

    @property
    def length(self) -> int:
        return self.k[0].shape[1]


@torch.no_grad()
def encode_prefixes(model: CogVLM, pixels: torch.Tensor) -> list[Prefix]:
    """Vision tower + language-model prefill of the image prefix, for a batch of images (n, 3, S, S)."""
    return prefill_prefixes(model, model.encode_images(pixels))


@torch.no_grad()
def prefill_prefixes(model: CogVLM, feats: torch.Tensor) -> list[Prefix]:
    """Language-model prefill of `[bos, image features]` for image features (n, n_vis, D)."""
    cfg = model.config
    n = feats.shape[0]
    P = cfg.vision_tokens + 1
    device = model.device
    ids = torch.full((n, P), cfg.image_placeholder_id, dtype=torch.long, device=device)
    ids[:, 0] = cfg.bos_token_id
    types = torch.full((n, P), VISION, dtype=torch.long, device=device)
    types[:, 0] = LANGUAGE
    mask = torch.ones_like(types)
    positions = build_position_ids(types, mask)
    cache = KVCache(cfg, n, P, model.dtype, device)
    model.model(model.model.embed(ids, types, feats.to(device)), types, positions, mask, cache)
    # The first text token follows eoi: one more than the largest prefix position.
    next_position = int(positions[0, -1]) + 1
    return [Prefix([k[i] for k in cache.k], [v[i] for v in cache.v], next_position) for i in range(n)]


@dataclass
class EngineRequest:
    key: Any  # the caller's handle, returned with the result
    prefix: Prefix
    text_ids: list[int]  # the prompt's tokens after the image (no bos)


@dataclass
class EngineResult:
    key: Any
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


@dataclass
class EngineStats:
    decode_steps: int = 0
    decode_rows: int = 0  # sum over steps of sequences in flight: mean batch = rows / steps
    prefill_tokens: int = 0
    prefill_padding: int = 0
    admissions: int = 0

    def add(self, other: EngineStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Slot:
    request: EngineRequest
    seq: Sequence
    position: int  # rotary position of the next token
    token: int = -1  # the last chosen token, input of the next step


class DecodeEngine:
    """Up to `slots` sequences in flight over a slot KV cache; finished ones make room for new ones."""

    def __init__(self, model: CogVLM, cfg: GenerationConfig, slots: int, max_text: int) -> None:
        self.model, self.cfg, self.slots = model, cfg, slots
        self.device = model.device
        self.stop_ids = stop_ids_for(model, cfg)
        self.prefix_len = model.config.vision_tokens + 1
        max_len = self.prefix_len + max_text + cfg.max_new_tokens
        self.cache = SlotKVCache(model.config, slots, max_len, model.dtype, self.device)
        self.seen = torch.zeros(slots, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.active: list[_Slot] = []
        self.admitting: list[EngineRequest] = []  # being prefilled: in flight although not in a slot yet
        self.results: list[EngineResult] = []  # finished so far: survives an exception mid-run
        self.stats = EngineStats()
        self.on_result: Callable[[EngineResult], None] | None = None

    @torch.no_grad()
    def run(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Generate for every request; results in completion order (keys say which is which)."""
        # Similar prompt lengths enter together, so prefill padding stays small; ties keep input order.
        queue = sorted(requests, key=lambda r: len(r.text_ids))
        while queue or self.active:
            free = self.slots - len(self.active)
            if queue and free:
                admitted, queue = queue[:free], queue[free:]
                self._admit(admitted)
            else:
                self._step()
        return self.results

    # -- internals --------------------------------------------------------------------------------

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Language-model pass over the selected slots; returns final hidden states (B, L, D)."""
        embeds = self.model.model.embed_tokens(tokens)
        types = torch.zeros_like(tokens)  # everything after the prefix is text
        bias = self.cache.bias(tokens.shape[1], embeds.dtype)
        return self.model.model(embeds, types, positions, None, self.cache, attn_bias=bias)

    def _admit(self, requests: list[EngineRequest]) -> None:
        """Copy each request's prefix into a free slot, prefill the prompts together, pick first tokens."""
        self.admitting = requests
        start = len(self.active)
        stop = start + len(requests)
        lengths = [len(r.text_ids) for r in requests]
        L = max(lengths)
        tokens = torch.full((len(requests), L), self.model.config.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(requests), L), dtype=torch.long)
        for i, r in enumerate(requests):
            self.cache.load_prefix(start + i, r.prefix.k, r.prefix.v)
            tokens[i, : lengths[i]] = torch.tensor(r.text_ids, dtype=torch.long)
            positions[i] = r.prefix.next_position + torch.arange(L)  # right pads: ignored, later overwritten
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        self.cache.select(start, stop)
        hidden = self._forward(tokens, positions)
        real = torch.tensor(lengths, device=self.device)
        self.cache.advance(real)
        last = hidden[torch.arange(len(requests), device=self.device), real - 1]  # each prompt's last token
        logits = self.model.lm_head(last).float()

        self.seen[start:stop] = False
        bos = self.model.config.bos_token_id
        for i, r in enumerate(requests):
            prompt_text = [bos, *r.text_ids]  # what generate() counts as the prompt's text tokens
            self.seen[start + i, prompt_text] = True
            seq = Sequence(prompt_text, self.cfg, self.stop_ids, self.device)
            self.active.append(_Slot(r, seq, r.prefix.next_position + lengths[i]))
        self.admitting = []
        self.stats.admissions += 1
        self.stats.prefill_tokens += len(requests) * L
        self.stats.prefill_padding += len(requests) * L - sum(lengths)
        self._choose(logits, start, stop)

    def _step(self) -> None:
        """One decode step for every slot in flight."""
        n = len(self.active)
        tokens = torch.tensor([[s.token] for s in self.active], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.position] for s in self.active], dtype=torch.long, device=self.device)
        self.cache.select(0, n)
        hidden = self._forward(tokens, positions)
        self.cache.advance(1)
        for s in self.active:
            s.position += 1
        self.stats.decode_steps += 1
        self.stats.decode_rows += n
        self._choose(self.model.lm_head(hidden[:, -1].contiguous()).float(), 0, n)

    def _choose(self, logits: torch.Tensor, start: int, stop: int) -> None:
        slots = self.active[start:stop]
        tokens = choose_tokens(logits, [s.seq for s in slots], self.seen[start:stop], self.cfg).tolist()
        for s, tok in zip(slots, tokens, strict=True):
            s.seq.push(tok)
            s.token = tok
        rows = torch.arange(start, stop, device=self.device)
        self.seen[rows, torch.tensor(tokens, device=self.device)] = True
        # Retire finished sequences; the last slot in flight moves into each hole (slots stay contiguous).
        for i in range(stop - 1, start - 1, -1):
            if self.active[i].seq.finish is not None:
                self._retire(i)

    def _retire(self, i: int) -> None:
        done = self.active[i]
        seq = done.seq
        result = EngineResult(
            done.request.key,
            seq.out,
            decode_text(self.model.tokenizer, seq.out),
            seq.finish,
            self.prefix_len + len(done.request.text_ids),
        )
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)
        last = len(self.active) - 1
        if i != last:
            self.cache.move(last, i)
            self.seen[i] = self.seen[last]
            self.active[i] = self.active[last]
        self.active.pop()


@dataclass
class PrefixStore:
    """Prefixes of a chunk of images, by image key, with how often each was reused."""

    prefixes: dict[Any, Prefix] = field(default_factory=dict)
    uses: dict[Any, int] = field(default_factory=dict)

    def get(self, key: Any) -> Prefix:
        self.uses[key] = self.uses.get(key, 0) + 1
        return self.prefixes[key]

    @property
    def reuses(self) -> int:
        return sum(max(0, n - 1) for n in self.uses.values())

"""Continuous batching over shared image prefixes: the pipeline's generation path.

A captioning job spends most of its compute on the image: CogVLM2 turns every image into 2,306
tokens before the first word of the prompt. Here each image is encoded once and its prefix
(`bos` + image tokens) run through the language model once; every prompt about that image starts
from a copy of that prefix's keys and values and only its own text is prefilled. Decoding keeps up
to `slots` sequences in flight; a sequence that finishes hands its slot to the next request.

    store = PrefixStore(lambda image: prefill_prefixes(model, features[image][None])[0])
    decoder = ContinuousDecoder(model, gen_cfg, slots=8, max_text=64, prefixes=store)
    results = decoder.run([DecodeRequest(key, image, text_ids) ...])   # or a `Prefix` instead of `image`

A prefix costs device memory (~0.28 GiB per CogVLM2 image), so a `PrefixStore` makes it when the
first request about its image enters a slot and drops it when the last one has; with requests
ordered image by image at most one prefix is held at a time. Requests may carry their own
generation settings, and settings for retries after a looping output (the retry restarts in the
same slot, from the prefix still at its head).

Greedy results equal those of `generate()` on the same request alone: the same positions, the same
expert routing, the same masks; only the order of floating-point sums differs.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cogbatch.model.generate import Sequence, choose_tokens, decode_text, stop_ids_for
from cogbatch.model.kvcache import KVCache, SlotKVCache
from cogbatch.model.language import LANGUAGE, VISION, build_position_ids
from cogbatch.model.settings import GenerationConfig

if TYPE_CHECKING:
    from cogbatch.model.cogvlm import CogVLM


@dataclass
class Prefix:
    """Keys and values of `[bos, boi, patches..., eoi]` for one image, per layer (Hkv, P, hd).

    Stored as the model's cache stores them (held device memory): for an int8 KV cache, int8 keys and
    values with their scales per layer (Hkv, P, 1).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    next_position: int  # rotary position of the first text token
    k_scale: list[torch.Tensor] | None = None
    v_scale: list[torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def planes(self) -> list[list[torch.Tensor]]:
        """In `KVCache.planes` order, for `SlotKVCache.load_prefix`."""
        scales = [self.k_scale, self.v_scale] if self.k_scale is not None else []
        return [self.k, self.v, *scales]


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
    cache = KVCache(cfg, n, P, model.dtype, device, model.kv_cache)
    model.model(model.model.embed(ids, types, feats.to(device)), types, positions, mask, cache)
    # The first text token follows eoi: one more than the largest prefix position.
    next_position = int(positions[0, -1]) + 1
    prefixes = []
    for i in range(n):
        k, v, *scales = ([t[i] for t in plane] for plane in cache.planes())
        prefixes.append(Prefix(k, v, next_position, *scales))
    return prefixes


class PrefixStore:
    """Image prefixes made on first use, shared by the requests about the image, dropped after the last.

    `expect` announces the requests about each image; `take` hands one request its image's prefix,
    making it if needed, and forgets it once no announced request about that image is left. The
    requests of one image should therefore enter one after the other: then only one prefix is held
    while its requests wait for free slots, which is what the memory planner assumes.
    """

    def __init__(self, make: Callable[[Any], Prefix]) -> None:
        self.make = make
        self.held: dict[Any, Prefix] = {}
        self.waiting: Counter[Any] = Counter()
        self.prefills = 0  # prefixes made
        self.copies = 0  # prefixes handed out
        self.most_live = 0  # most prefixes alive at once (held ones + the one being made)

    def expect(self, keys: Iterable[Any]) -> None:
        self.waiting.update(keys)

    def take(self, key: Any) -> Prefix:
        prefix = self.held.pop(key, None)
        if prefix is None:
            self.most_live = max(self.most_live, len(self.held) + 1)
            prefix = self.make(key)
            self.prefills += 1
        self.copies += 1
        self.waiting[key] -= 1
        if self.waiting[key] > 0:
            self.held[key] = prefix
        else:
            del self.waiting[key]
        return prefix

    def clear(self) -> None:
        """Forget everything (after an out-of-memory error, before the retry announces its requests)."""
        self.held.clear()
        self.waiting.clear()

    @property
    def reuses(self) -> int:
        """Prompts that started from a prefix made for an earlier prompt about the same image."""
        return self.copies - self.prefills


@dataclass
class DecodeRequest:
    key: Any  # the caller's handle, returned with the result
    prefix: Any  # a `Prefix`, or the image key under which the decoder's `PrefixStore` makes it
    text_ids: list[int]  # the prompt's tokens after the image (no bos)
    cfg: GenerationConfig | None = None  # None: the decoder's settings
    retries: tuple[GenerationConfig, ...] = ()  # settings of each new attempt after a looping output


@dataclass
class DecodeResult:
    key: Any
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    attempts: int = 1  # generations made: more than 1 after retries of looping outputs


@dataclass
class DecodeStats:
    decode_steps: int = 0
    decode_rows: int = 0  # sum over steps of sequences in flight: mean batch = rows / steps
    prefill_tokens: int = 0
    prefill_padding: int = 0
    admissions: int = 0  # prompt prefills that brought new requests into free slots
    restarts: int = 0  # retries of looping outputs, restarted in their slot

    def add(self, other: DecodeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Slot:
    request: DecodeRequest
    cfg: GenerationConfig
    text_start: int  # rotary position of the first text token (after the prefix)
    position: int = 0  # rotary position of the next token
    seq: Sequence | None = None
    attempt: int = 0  # index into (request.cfg, *request.retries)
    token: int = -1  # the last chosen token, input of the next step
    restart: bool = False  # ended in a loop and has a retry left: prefilled again before the next step


class ContinuousDecoder:
    """Up to `slots` sequences in flight over a slot KV cache; finished ones make room for new ones.

    The cache holds `prefix + max_text + max_new` tokens per slot (`max_new` defaults to
    `cfg.max_new_tokens`); requests are taken in the order given.
    """

    def __init__(
        self,
        model: CogVLM,
        cfg: GenerationConfig,
        slots: int,
        max_text: int,
        max_new: int | None = None,
        prefixes: PrefixStore | None = None,
    ) -> None:
        self.model, self.cfg, self.slots = model, cfg, slots
        self.prefixes = prefixes
        self.device = model.device
        self.prefix_len = model.config.vision_tokens + 1
        self.max_text, self.max_new = max_text, max_new or cfg.max_new_tokens
        max_len = self.prefix_len + max_text + self.max_new
        self.cache = SlotKVCache(model.config, slots, max_len, model.dtype, self.device, model.kv_cache)
        self.seen = torch.zeros(slots, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.active: list[_Slot] = []
        self.admitting: list[DecodeRequest] = []  # taken from the queue, not in a slot yet
        self.results: list[DecodeResult] = []  # finished so far: survives an exception mid-run
        self.stats = DecodeStats()
        self.on_result: Callable[[DecodeResult], None] | None = None
        self._restarts = 0

    @torch.no_grad()
    def run(self, requests: list[DecodeRequest]) -> list[DecodeResult]:
        """Generate for every request; results in completion order (keys say which is which)."""
        for r in requests:
            self._check(r)
        if self.prefixes is not None:
            self.prefixes.expect(r.prefix for r in requests if not isinstance(r.prefix, Prefix))
        queue = deque(requests)
        while queue or self.active:
            free = self.slots - len(self.active)
            if self._restarts:
                self._restart(next(i for i, s in enumerate(self.active) if s.restart))
            elif queue and free:
                self._admit([queue.popleft() for _ in range(min(free, len(queue)))])
            else:
                self._step()
        return self.results

    # -- internals --------------------------------------------------------------------------------

    def _check(self, r: DecodeRequest) -> None:
        if len(r.text_ids) > self.max_text:
            raise ValueError(f"a prompt of {len(r.text_ids)} tokens in a decoder planned for {self.max_text}")
        longest = max(c.max_new_tokens for c in self._settings(r))
        if longest > self.max_new:
            raise ValueError(f"max_new_tokens {longest} in a decoder planned for {self.max_new}")

    def _settings(self, r: DecodeRequest) -> tuple[GenerationConfig, ...]:
        """Settings of each attempt: the request's own (else the decoder's), then its retries."""
        return (r.cfg or self.cfg, *r.retries)

    def _prefix(self, r: DecodeRequest) -> Prefix:
        if isinstance(r.prefix, Prefix):
            return r.prefix
        if self.prefixes is None:
            raise ValueError("a request names its image's prefix, but the decoder has no PrefixStore")
        return self.prefixes.take(r.prefix)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Language-model pass over the selected slots; returns final hidden states (B, L, D)."""
        embeds = self.model.model.embed_tokens(tokens)
        types = torch.zeros_like(tokens)  # everything after the prefix is text
        bias = self.cache.bias(tokens.shape[1], embeds.dtype)
        return self.model.model(embeds, types, positions, None, self.cache, attn_bias=bias)

    def _admit(self, requests: list[DecodeRequest]) -> None:
        """Copy each request's prefix into the next free slot, then prefill their prompts together."""
        start = len(self.active)
        self.admitting = list(requests)
        while self.admitting:
            r = self.admitting[0]
            prefix = self._prefix(r)
            self.cache.load_prefix(len(self.active), prefix.planes())
            self.active.append(_Slot(r, r.cfg or self.cfg, prefix.next_position))
            self.admitting.pop(0)
            del prefix  # copied: unless its store holds it for another request, its memory goes before the next
        self.stats.admissions += 1
        self._prefill(start, len(self.active))

    def _restart(self, i: int) -> None:
        """Try slot `i`'s request again with its next settings; its prefix is still at the head of the slot."""
        s = self.active[i]
        s.attempt += 1
        s.cfg, s.restart = self._settings(s.request)[s.attempt], False
        self._restarts -= 1
        self.cache.lengths[i] = self.prefix_len
        self.stats.restarts += 1
        self._prefill(i, i + 1)

    def _prefill(self, start: int, stop: int) -> None:
        """Prompts of slots `[start, stop)` (prefix in place) in one pass, then each one's first token."""
        slots = self.active[start:stop]
        lengths = [len(s.request.text_ids) for s in slots]
        L = max(lengths)
        tokens = torch.full((len(slots), L), self.model.config.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(slots), L), dtype=torch.long)
        for i, s in enumerate(slots):
            tokens[i, : lengths[i]] = torch.tensor(s.request.text_ids, dtype=torch.long)
            positions[i] = s.text_start + torch.arange(L)  # right pads: ignored, later overwritten
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        self.cache.select(start, stop)
        hidden = self._forward(tokens, positions)
        real = torch.tensor(lengths, device=self.device)
        self.cache.advance(real)
        last = hidden[torch.arange(len(slots), device=self.device), real - 1]  # each prompt's last token
        logits = self.model.lm_head(last).float()

        self.seen[start:stop] = False
        bos = self.model.config.bos_token_id
        for i, s in enumerate(slots):
            prompt_text = [bos, *s.request.text_ids]  # what generate() counts as the prompt's text tokens
            self.seen[start + i, prompt_text] = True
            s.seq = Sequence(prompt_text, s.cfg, stop_ids_for(self.model, s.cfg), self.device)
            s.position = s.text_start + lengths[i]
        self.stats.prefill_tokens += len(slots) * L
        self.stats.prefill_padding += len(slots) * L - sum(lengths)
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

    def _pick(self, logits: torch.Tensor, start: int, stop: int) -> list[int]:
        """Next tokens of slots `[start, stop)`, each row under its own settings (rows do not interact)."""
        slots = self.active[start:stop]
        groups: dict[GenerationConfig, list[int]] = {}
        for j, s in enumerate(slots):
            groups.setdefault(s.cfg, []).append(j)
        if len(groups) == 1:
            return choose_tokens(logits, [s.seq for s in slots], self.seen[start:stop], slots[0].cfg).tolist()
        out = [0] * len(slots)
        for cfg, rows in groups.items():
            idx = torch.tensor(rows, device=logits.device)
            picked = choose_tokens(logits[idx], [slots[j].seq for j in rows], self.seen[start + idx], cfg)
            for j, tok in zip(rows, picked.tolist(), strict=True):
                out[j] = tok
        return out

    def _choose(self, logits: torch.Tensor, start: int, stop: int) -> None:
        slots = self.active[start:stop]
        tokens = self._pick(logits, start, stop)
        for s, tok in zip(slots, tokens, strict=True):
            s.seq.push(tok)
            s.token = tok
        rows = torch.arange(start, stop, device=self.device)
        self.seen[rows, torch.tensor(tokens, device=self.device)] = True
        # Retire finished sequences; the last slot in flight moves into each hole (slots stay contiguous).
        for i in range(stop - 1, start - 1, -1):
            s = self.active[i]
            if s.seq.finish is None:
                continue
            if s.seq.finish == "repetition" and s.attempt < len(s.request.retries):
                s.restart = True
                self._restarts += 1
            else:
                self._retire(i)

    def _retire(self, i: int) -> None:
        done = self.active[i]
        seq = done.seq
        result = DecodeResult(
            done.request.key,
            seq.out,
            decode_text(self.model.tokenizer, seq.out),
            seq.finish,
            self.prefix_len + len(done.request.text_ids),
            done.attempt + 1,
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

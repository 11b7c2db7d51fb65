"""Batched generation: one prefill over the whole left-padded prompt, then token-by-token decode.

Follows the greedy / sampling semantics of transformers' `generate()` that THUDM's `modeling_cogvlm.py`
(cogvlm-chat-hf, cogvlm2-llama3-chat-19B) relies on, without its remote code.

Decoding is deterministic per request: greedy picks the argmax, sampling draws from a generator
seeded per sequence (not per batch), so a request gives the same text alone or in any batch.
Sequences that finish are dropped from the batch (and from the KV cache) so they stop costing work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cogbatch.model.kvcache import KVCache
from cogbatch.model.language import padding_invariant_position_ids
from cogbatch.model.prompts import BatchInputs
from cogbatch.model.settings import GenerationConfig

if TYPE_CHECKING:
    from cogbatch.model.cogvlm import CogVLM


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # new tokens per sample, the stop token excluded
    texts: list[str]
    finish_reasons: list[str]  # "eos" (a stop token), "length" (max_new_tokens) or "repetition" (a loop)
    prompt_tokens: list[int]
    step_logits: list[torch.Tensor] | None = None  # per sample (steps, V) raw logits, when asked for
    timings: dict[str, float] = field(default_factory=dict)  # encode_s, prefill_s, decode_s (wall seconds)


def _apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in transformers: positive logits divided, negative multiplied."""
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_scores.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def looping_tail(tokens: list[int], max_period: int = 16, min_span: int = 16, min_repeats: int = 3) -> bool:
    """True when the output ends in a loop: a block of <= `max_period` tokens repeated back to back.

    The block must repeat at least `min_repeats` times and cover at least `min_span` tokens, so
    "very very" is fine while sixteen identical tokens, or a phrase said three times over, is a loop.
    """
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = p * max(min_repeats, -(-min_span // p))
        if span > n:
            continue
        tail = tokens[n - span :]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return False


class Sequence:
    """One request's decoding state: output so far, its own sampler, its stop rules."""

    def __init__(self, prompt_text: list[int], cfg: GenerationConfig, stop_ids: set[int], device: torch.device):
        self.cfg, self.stop_ids = cfg, stop_ids
        self.out: list[int] = []
        self.finish: str | None = None
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None
        self.history = list(prompt_text)  # what n-gram bans look at: prompt text, then output
        self.ngrams: dict[tuple[int, ...], set[int]] = {}
        n = cfg.no_repeat_ngram_size
        for i in range(len(self.history) - n + 1 if n else 0):
            self._add_ngram(i)

    def _add_ngram(self, start: int) -> None:
        n = self.cfg.no_repeat_ngram_size
        gram = self.history[start : start + n]
        self.ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> set[int]:
        """Tokens that would complete an n-gram already present (transformers' no_repeat_ngram_size)."""
        n = self.cfg.no_repeat_ngram_size
        if not n or len(self.history) < n - 1:
            return set()
        return self.ngrams.get(tuple(self.history[len(self.history) - n + 1 :]), set())

    def push(self, token: int) -> None:
        if token in self.stop_ids:
            self.finish = "eos"
            return
        self.out.append(token)
        self.history.append(token)
        if self.cfg.no_repeat_ngram_size and len(self.history) >= self.cfg.no_repeat_ngram_size:
            self._add_ngram(len(self.history) - self.cfg.no_repeat_ngram_size)
        if len(self.out) >= self.cfg.max_new_tokens:
            self.finish = "length"
        elif self.cfg.stop_on_repetition and looping_tail(self.out):
            self.finish = "repetition"


def choose_tokens(logits: torch.Tensor, seqs: list[Sequence], seen: torch.Tensor, cfg: GenerationConfig):
    """Next token of every row: penalties and bans, then greedy argmax or a per-sequence sample."""
    scores = logits
    if cfg.repetition_penalty != 1.0:
        scores = _apply_repetition_penalty(scores, seen, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        for j, seq in enumerate(seqs):
            banned = seq.banned()
            if banned:
                scores[j, list(banned)] = float("-inf")
    if not cfg.do_sample:
        return scores.argmax(-1)
    scores = _filter_top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = scores.softmax(-1)
    return torch.cat([torch.multinomial(probs[j], 1, generator=seq.generator) for j, seq in enumerate(seqs)])


def stop_ids_for(model: CogVLM, cfg: GenerationConfig) -> set[int]:
    return set(model.config.eos_token_ids if cfg.stop_token_ids is None else cfg.stop_token_ids)


def decode_text(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return ""
    # No clean-up pass: for BPE tokenizers it deletes real spaces before punctuation.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class _PhaseClock:
    """Wall time per phase; on CUDA it synchronises at phase ends only, not per token."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.laps: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = now - self.t
        self.t = now


@torch.no_grad()
def generate(
    model: CogVLM,
    batch: BatchInputs,
    cfg: GenerationConfig,
    tokenizer: Any = None,
    image_features: torch.Tensor | None = None,
    return_logits: bool = False,
) -> GenerationOutput:
    """Generate for a left-padded batch; `image_features` may replace `batch.images` (already encoded)."""
    device = model.device
    batch = batch.to(device)
    B, L = batch.input_ids.shape
    clock = _PhaseClock(device)
    if image_features is None and batch.images is not None:
        image_features = model.encode_images(batch.images)
    clock.lap("encode_s")

    embeds = model.model.embed(batch.input_ids, batch.token_type_ids, image_features)
    positions = padding_invariant_position_ids(batch.token_type_ids, batch.attention_mask)
    cache = KVCache(model.config, B, L + cfg.max_new_tokens, embeds.dtype, device, model.kv_cache)
    hidden = model.model(embeds, batch.token_type_ids, positions, batch.attention_mask, cache)
    cache.advance(L)
    # Only the last position predicts. Contiguous: the fused int4 kernels refuse strided activations.
    logits = model.lm_head(hidden[:, -1].contiguous()).float()  # (B, V)
    next_pos = positions[:, -1] + 1  # (B,)
    attention_mask = batch.attention_mask
    clock.lap("prefill_s")

    # Tokens the repetition penalty looks at: the prompt's real text tokens, then every output token.
    text = (batch.attention_mask == 1) & (batch.token_type_ids == 0)
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, torch.where(text, batch.input_ids, 0), text)
    stop_ids = stop_ids_for(model, cfg)
    seqs = [Sequence(batch.input_ids[b][text[b]].tolist(), cfg, stop_ids, device) for b in range(B)]
    active = list(range(B))  # original sample index of each batch row
    step_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
    while True:
        if return_logits:
            for j, r in enumerate(active):
                step_logits[r].append(logits[j].cpu())
        tokens = choose_tokens(logits, [seqs[r] for r in active], seen, cfg)  # (B_active,)
        for r, tok in zip(active, tokens.tolist(), strict=True):
            seqs[r].push(tok)
        keep = [j for j, r in enumerate(active) if seqs[r].finish is None]
        if not keep:
            break
        if len(keep) < len(active):  # drop finished sequences from every per-row tensor
            idx = torch.tensor(keep, device=device)
            cache.keep(idx)
            tokens, next_pos, attention_mask, seen = tokens[idx], next_pos[idx], attention_mask[idx], seen[idx]
            active = [active[j] for j in keep]
        seen.scatter_(1, tokens.unsqueeze(1), True)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
        step_types = torch.zeros(len(active), 1, dtype=torch.long, device=device)  # generated text is language
        hidden = model.model(
            model.model.embed_tokens(tokens.unsqueeze(1)), step_types, next_pos.unsqueeze(1), attention_mask, cache
        )
        cache.advance(1)
        logits = model.lm_head(hidden[:, -1].contiguous()).float()
        next_pos = next_pos + 1

    clock.lap("decode_s")
    out_ids = [seq.out for seq in seqs]
    texts = [decode_text(tokenizer, ids) for ids in out_ids]
    prompt_tokens = batch.attention_mask.sum(-1).tolist()
    logits_out = [torch.stack(s) if s else torch.empty(0) for s in step_logits] if return_logits else None
    return GenerationOutput(out_ids, texts, [seq.finish for seq in seqs], prompt_tokens, logits_out, clock.laps)

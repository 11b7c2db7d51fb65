"""Batched generation: one prefill over the whole left-padded prompt, then token-by-token decode.

Decoding is deterministic per request: greedy picks the argmax, sampling draws from a generator
seeded per sequence (not per batch), so a request gives the same text alone or in any batch.
Sequences that finish are dropped from the batch (and from the KV cache) so they stop costing work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cogbatch.model.language import KVCache, padding_invariant_position_ids
from cogbatch.model.prompts import BatchInputs

if TYPE_CHECKING:
    from cogbatch.model.cogvlm import CogVLM


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids; (): never stop early

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be a positive integer")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # new tokens per sample, the stop token excluded
    texts: list[str]
    finish_reasons: list[str]  # "eos" (a stop token) or "length" (max_new_tokens reached)
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


class _Sampler:
    """Turns raw logits into next tokens; one generator per sequence keeps sampling batch-invariant."""

    def __init__(self, cfg: GenerationConfig, batch: int, device: torch.device) -> None:
        self.cfg = cfg
        self.generators = None
        if cfg.do_sample:
            self.generators = [torch.Generator(device=device).manual_seed(cfg.seed) for _ in range(batch)]

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor, rows: list[int]) -> torch.Tensor:
        cfg = self.cfg
        scores = logits
        if cfg.repetition_penalty != 1.0:
            scores = _apply_repetition_penalty(scores, seen, cfg.repetition_penalty)
        if not cfg.do_sample:
            return scores.argmax(-1)
        scores = _filter_top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p)
        probs = scores.softmax(-1)
        return torch.cat([torch.multinomial(probs[j], 1, generator=self.generators[r]) for j, r in enumerate(rows)])


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


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return ""
    # No clean-up pass: for BPE tokenizers it deletes real spaces before punctuation.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
    stop_ids = set(model.config.eos_token_ids if cfg.stop_token_ids is None else cfg.stop_token_ids)
    clock = _PhaseClock(device)
    if image_features is None and batch.images is not None:
        image_features = model.encode_images(batch.images)
    clock.lap("encode_s")

    embeds = model.model.embed(batch.input_ids, batch.token_type_ids, image_features)
    positions = padding_invariant_position_ids(batch.token_type_ids, batch.attention_mask)
    cache = KVCache(model.config, B, L + cfg.max_new_tokens, embeds.dtype, device)
    hidden = model.model(embeds, batch.token_type_ids, positions, batch.attention_mask, cache)
    logits = model.lm_head(hidden[:, -1]).float()  # (B, V): only the last position predicts
    next_pos = positions[:, -1] + 1  # (B,)
    attention_mask = batch.attention_mask
    clock.lap("prefill_s")

    # Tokens the repetition penalty looks at: the prompt's real text tokens, then every output token.
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    text = (batch.attention_mask == 1) & (batch.token_type_ids == 0)
    seen.scatter_(1, torch.where(text, batch.input_ids, 0), text)

    sampler = _Sampler(cfg, B, device)
    rows = list(range(B))  # original sample index of each active batch row
    out_ids: list[list[int]] = [[] for _ in range(B)]
    finish: list[str] = ["length"] * B
    step_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for _ in range(cfg.max_new_tokens):
        if return_logits:
            for j, r in enumerate(rows):
                step_logits[r].append(logits[j].cpu())
        tokens = sampler(logits, seen, rows)  # (B_active,)
        keep = []
        for j, (r, tok) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if tok in stop_ids:
                finish[r] = "eos"
                continue
            out_ids[r].append(tok)
            if len(out_ids[r]) < cfg.max_new_tokens:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):  # drop finished sequences from every per-row tensor
            idx = torch.tensor(keep, device=device)
            cache.keep(idx)
            tokens, next_pos, attention_mask, seen = tokens[idx], next_pos[idx], attention_mask[idx], seen[idx]
            rows = [rows[j] for j in keep]
        seen.scatter_(1, tokens.unsqueeze(1), True)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        step_types = torch.zeros(len(rows), 1, dtype=torch.long, device=device)  # generated text is language
        hidden = model.model(
            model.model.embed_tokens(tokens.unsqueeze(1)), step_types, next_pos.unsqueeze(1), attention_mask, cache
        )
        logits = model.lm_head(hidden[:, -1]).float()
        next_pos = next_pos + 1

    clock.lap("decode_s")
    texts = [_decode(tokenizer, ids) for ids in out_ids]
    prompt_tokens = batch.attention_mask.sum(-1).tolist()
    logits_out = [torch.stack(s) if s else torch.empty(0) for s in step_logits] if return_logits else None
    return GenerationOutput(out_ids, texts, finish, prompt_tokens, logits_out, clock.laps)

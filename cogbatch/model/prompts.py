"""Prompt templates and the input layout of the reference `build_conversation_input_ids`.

Adapted from THUDM's `modeling_cogvlm.py` (cogvlm-chat-hf: `_history_to_prompt` and its templates;
cogvlm2-llama3-chat-19B: the same layout with Llama-3 tokens).

Layout of one sample: `[bos] + [placeholder] * n_vis (only with an image) + tokens(prompt)`, with
token types `0, 1 * n_vis, 0 ...`. The image always comes right after bos, before the whole text.
Batches are left-padded so that every sample's next token is predicted from its own last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cogbatch.model.config import CogVLMConfig
from cogbatch.model.language import LANGUAGE, VISION

Template = Literal["base", "chat", "vqa"]
TEMPLATES: tuple[str, ...] = ("base", "chat", "vqa")


def history_to_prompt(query: str, history: Sequence[tuple[str, str]] = (), template: str = "chat") -> str:
    """The reference `_history_to_prompt`: `base` ignores history; no space after the final colon."""
    if template == "base":
        return query
    if template == "chat":
        turns = "".join(f"Question: {q} Answer: {r}\n" for q, r in history)
        return turns + f"Question: {query} Answer:"
    if template == "vqa":
        turns = "".join(f"Question: {q} Short answer: {r}\n" for q, r in history)
        return turns + f"Question: {query} Short answer:"
    raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


@dataclass
class PromptInputs:
    """One sample before batching. `image` is a preprocessed (3, S, S) tensor or None."""

    input_ids: list[int]
    token_type_ids: list[int]
    image: torch.Tensor | None = None
    prompt: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class BatchInputs:
    """A left-padded batch. `images` holds one image per sample that has image slots, in batch order."""

    input_ids: torch.Tensor  # (B, L) int64
    token_type_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 0 on padding
    images: torch.Tensor | None  # (n_img, 3, S, S) or None

    def to(self, device: torch.device | str) -> BatchInputs:
        images = self.images.to(device) if self.images is not None else None
        return BatchInputs(
            self.input_ids.to(device), self.token_type_ids.to(device), self.attention_mask.to(device), images
        )


def build_inputs(
    tokenizer: Any,
    cfg: CogVLMConfig,
    query: str,
    image: torch.Tensor | None = None,
    template: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> PromptInputs:
    """Token ids and types for one query, with an optional preprocessed image."""
    prompt = history_to_prompt(query, history, template or cfg.template_version)
    text_ids = tokenizer.encode(prompt, add_special_tokens=False)
    n_vis = cfg.vision_tokens if image is not None else 0
    if image is not None:
        S = cfg.vision.image_size
        if tuple(image.shape) != (3, S, S):
            raise ValueError(f"image tensor must be (3, {S}, {S}) for this model, got {tuple(image.shape)}")
    input_ids = [cfg.bos_token_id] + [cfg.image_placeholder_id] * n_vis + list(text_ids)
    token_type_ids = [LANGUAGE] + [VISION] * n_vis + [LANGUAGE] * len(text_ids)
    return PromptInputs(input_ids, token_type_ids, image, prompt)


def collate(samples: Sequence[PromptInputs], pad_token_id: int) -> BatchInputs:
    """Left-pad samples to one batch; pads are language-typed and masked out."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    L = max(len(s) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    token_type_ids = torch.full((B, L), LANGUAGE, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        input_ids[i, L - n :] = torch.tensor(s.input_ids, dtype=torch.long)
        token_type_ids[i, L - n :] = torch.tensor(s.token_type_ids, dtype=torch.long)
        attention_mask[i, L - n :] = 1
    imgs = [s.image for s in samples if s.image is not None]
    images = torch.stack(imgs) if imgs else None
    return BatchInputs(input_ids, token_type_ids, attention_mask, images)

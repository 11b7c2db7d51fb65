"""Batched generation: batch invariance, stop conditions, sampling, repetition penalty."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.settings import GenerationConfig

QUERIES = [
    "Describe this image.",
    "What is in the picture?",
    "Write a short caption for this photo, please mention the colors and the shapes.",
    "What color is the square?",
    "Is there a circle?",
    "Describe the picture in detail.",
    "How many shapes are there?",
    "What is the main object?",
]


@pytest.fixture(scope="module", params=["cogvlm1", "cogvlm2"])
def model(request, golden_dir):
    return CogVLM.from_pretrained(golden_dir / request.param / "dev", dtype="float32", device="cpu")


def _images(golden_dir, n):
    names = ["img_a_rgb_150x97.png", "img_b_rgba_48x64.png", "img_c_palette_57x33.png"]
    imgs = [Image.open(golden_dir / "images" / name) for name in names]
    g = torch.Generator().manual_seed(7)
    while len(imgs) < n:  # extra random images of various sizes
        h, w = (int(x) for x in torch.randint(20, 90, (2,), generator=g))
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
        imgs.append(Image.fromarray(pixels))
    return imgs


def _samples(model, golden_dir, text_only=(5,)):
    imgs = _images(golden_dir, len(QUERIES))
    return [
        model.build_inputs(None, q, None if i in text_only else imgs[i], "chat" if i % 2 else "vqa")
        for i, q in enumerate(QUERIES)
    ]


def test_batch_of_eight_equals_each_alone(model, golden_dir):
    """Greedy text of a sample must not depend on what else is in its batch (left padding, masks)."""
    samples = _samples(model, golden_dir)
    cfg = GenerationConfig(max_new_tokens=12)
    batched = model.generate(model.collate(samples), cfg)
    for i, s in enumerate(samples):
        alone = model.generate(model.collate([s]), cfg)
        assert batched.token_ids[i] == alone.token_ids[0], f"sample {i}"
        assert batched.texts[i] == alone.texts[0]
        assert batched.finish_reasons[i] == alone.finish_reasons[0]
    assert batched.prompt_tokens == [len(s) for s in samples]


def _first_new_token_index(ids):
    return next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])


def test_stop_token_ends_only_its_sequence(model, golden_dir):
    samples = _samples(model, golden_dir)[:3]
    free = model.generate(model.collate(samples), GenerationConfig(max_new_tokens=10, stop_token_ids=()))
    assert free.finish_reasons == ["length"] * 3
    k = _first_new_token_index(free.token_ids[0])
    stop = free.token_ids[0][k]
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=(stop,))
    out = model.generate(model.collate(samples), cfg)
    assert out.token_ids[0] == free.token_ids[0][:k]  # the stop token itself is not part of the output
    assert out.finish_reasons[0] == "eos"
    for i in (1, 2):  # the others go on as they would alone, although row 0 left the batch early
        assert out.token_ids[i] == model.generate(model.collate([samples[i]]), cfg).token_ids[0]


def test_default_stop_tokens_are_the_checkpoint_eos_ids(model, golden_dir):
    """Llama-3 ends a turn with either of two ids; each must stop generation by default."""
    for eos in model.config.eos_token_ids:
        head = model.lm_head
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        biased.weight = head.weight
        with torch.no_grad():
            biased.bias.zero_()
            biased.bias[eos] = 1e4
        model.lm_head = biased
        try:
            out = model.generate(model.collate(_samples(model, golden_dir)[:2]), GenerationConfig(max_new_tokens=5))
        finally:
            model.lm_head = head
        assert out.token_ids == [[], []]
        assert out.finish_reasons == ["eos", "eos"]
    if model.config.generation == "cogvlm2":
        assert set(model.config.eos_token_ids) == {128001, 128009}


def test_sampling_is_seeded_per_request(model, golden_dir):
    samples = _samples(model, golden_dir)[:4]
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=3)
    batched = model.generate(model.collate(samples), cfg)
    for i, s in enumerate(samples):
        assert model.generate(model.collate([s]), cfg).token_ids[0] == batched.token_ids[i]
    other = model.generate(model.collate(samples), GenerationConfig(**{**cfg.__dict__, "seed": 4}))
    assert other.token_ids != batched.token_ids


def test_top_k_one_is_greedy(model, golden_dir):
    samples = _samples(model, golden_dir)[:3]
    greedy = model.generate(model.collate(samples), GenerationConfig(max_new_tokens=6))
    sampled = model.generate(model.collate(samples), GenerationConfig(max_new_tokens=6, do_sample=True, top_k=1))
    assert sampled.token_ids == greedy.token_ids


def test_repetition_penalty_avoids_seen_tokens(model, golden_dir):
    sample = model.build_inputs(None, "Describe this image.", _images(golden_dir, 1)[0])
    out = model.generate(model.collate([sample]), GenerationConfig(max_new_tokens=8, repetition_penalty=1e6,
                                                                   stop_token_ids=()))  # fmt: skip
    ids = out.token_ids[0]
    prompt_text_ids = {t for t, tt in zip(sample.input_ids, sample.token_type_ids, strict=True) if tt == 0}
    assert len(set(ids)) == len(ids)
    assert not set(ids) & prompt_text_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_generation_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)

"""`cogbatch.model.decoding`: continuous batching over shared image prefixes equals each request alone."""

from __future__ import annotations

import pytest
import torch

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.decoding import ContinuousDecoder, DecodeRequest, PrefixStore, encode_prefixes, prefill_prefixes
from cogbatch.model.generate import looping_tail
from cogbatch.model.settings import GenerationConfig
from tests.unit.model.helpers import plain, stuck_on


@pytest.fixture(scope="module")
def model(tiny_cogvlm2):
    return CogVLM.from_pretrained(tiny_cogvlm2, dtype="float32", device="cpu")


def test_continuous_refill_matches_each_request_alone(model, golden_dir):
    """Sequences finishing at different times hand their slot to waiting requests."""
    from PIL import Image

    imgs = [Image.open(golden_dir / "images" / n) for n in ("img_a_rgb_150x97.png", "img_c_palette_57x33.png")]
    prefixes = encode_prefixes(model, torch.stack([model.preprocess(i) for i in imgs]))
    queries = ["Describe this image.", "What is in the picture?", "Colors?", "Write a caption, please.", "Shapes?"]
    free = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    probe = [plain(model, q, imgs[0], free).token_ids[0] for q in queries]
    stop = probe[0][2]  # a token some sequences emit early and others late or never
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,))
    reqs = [
        DecodeRequest((i, q), prefixes[i], model.build_inputs(None, q).input_ids[1:])
        for i in range(2)
        for q in queries
    ]
    decoder = ContinuousDecoder(model, cfg, slots=3, max_text=32)
    results = {r.key: r for r in decoder.run(reqs)}
    lengths = set()
    for (i, q), r in results.items():
        alone = plain(model, q, imgs[i], cfg)
        assert r.token_ids == alone.token_ids[0] and r.finish_reason == alone.finish_reasons[0]
        lengths.add(len(r.token_ids))
    assert len(lengths) > 1  # really different lengths ...
    assert decoder.stats.admissions > len(reqs) / 3  # ... so slots were refilled mid-flight


def test_no_repeat_ngram_size_bans_repeats(model, golden_dir):
    from PIL import Image

    img = Image.open(golden_dir / "images" / "img_a_rgb_150x97.png")
    cfg = GenerationConfig(max_new_tokens=6, no_repeat_ngram_size=1, stop_token_ids=())
    with stuck_on(model, 1234):
        out = plain(model, "Describe.", img, cfg)
    ids = out.token_ids[0]
    assert ids[0] == 1234 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    "tokens, loops",
    [
        ([7] * 16, True),
        ([7] * 15, False),
        ([1, 2, 3] * 6, True),
        ([1, 2, 3] * 5, False),
        (list(range(20)) + [5, 6, 7, 8, 9] * 4, True),
        (list(range(40)), False),
        ([1, 2] * 7 + [3], False),
    ],
)
def test_looping_tail(tokens, loops):
    assert looping_tail(tokens) is loops


def test_int4_model_generates_batches_on_both_paths(tmp_path, golden_dir):
    """Fused int4 kernels (TinyGemm) refuse strided activations: batches > 1 must still work."""
    from PIL import Image

    from cogbatch.testing.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(
        tmp_path / "ck", arch="cogvlm1", hidden_size=128, vision_hidden_size=128, image_size=56, dtype="bf16"
    )
    model = CogVLM.from_pretrained(ckpt, dtype="bf16", device="cpu", quantization="int4", cache_dir=False)
    assert model.load_report.kernels.get("TinyGemmWeightQBitsTensor", 0) > 0
    imgs = [Image.open(golden_dir / "images" / n) for n in ("img_a_rgb_150x97.png", "img_b_rgba_48x64.png")]
    cfg = GenerationConfig(max_new_tokens=4, stop_token_ids=())
    out = model.generate(model.collate([model.build_inputs(None, "Describe.", i) for i in imgs]), cfg)
    assert [len(t) for t in out.token_ids] == [4, 4]
    prefixes = encode_prefixes(model, torch.stack([model.preprocess(i) for i in imgs]))
    ids = model.build_inputs(None, "Describe.").input_ids[1:]
    results = ContinuousDecoder(model, cfg, slots=2, max_text=len(ids)).run(
        [DecodeRequest(i, p, ids) for i, p in enumerate(prefixes)]
    )
    assert sorted(len(r.token_ids) for r in results) == [4, 4]


def _two_images(golden_dir):
    from PIL import Image

    return [Image.open(golden_dir / "images" / n) for n in ("img_a_rgb_150x97.png", "img_c_palette_57x33.png")]


def test_uninitialised_slot_cache_memory_never_reaches_the_output(model, golden_dir, monkeypatch):
    """A shorter slot's attention spans cache entries past its own length (masked out): whatever the
    allocator left there (NaN here, as uninitialised memory may hold) must not change the output."""
    imgs = _two_images(golden_dir)
    prefixes = encode_prefixes(model, torch.stack([model.preprocess(i) for i in imgs]))
    queries = ["Colors?", "Write a short caption for this photo, please mention the colors and the shapes."]
    cfg = GenerationConfig(max_new_tokens=5, stop_token_ids=())
    reqs = [
        DecodeRequest((i, q), prefixes[i], model.build_inputs(None, q).input_ids[1:])
        for i in range(2)
        for q in queries
    ]
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", poisoned)
        decoder = ContinuousDecoder(model, cfg, slots=4, max_text=32)
    for r in decoder.run(reqs):
        i, q = r.key
        assert r.token_ids == plain(model, q, imgs[i], cfg).token_ids[0], r.key


def test_prefixes_are_made_on_first_use_and_one_is_held_at_a_time(model, golden_dir):
    """Requests taken image by image: each prefix is made once, and dropped when its last request entered."""
    imgs = _two_images(golden_dir)
    imgs.append(imgs[0].transpose(0))  # a third image
    feats = model.encode_images(torch.stack([model.preprocess(i) for i in imgs]))
    store = PrefixStore(lambda i: prefill_prefixes(model, feats[i : i + 1])[0])
    queries = ["Describe this image.", "Colors?", "What is in the picture?"]
    cfg = GenerationConfig(max_new_tokens=4, stop_token_ids=())
    reqs = [DecodeRequest((i, q), i, model.build_inputs(None, q).input_ids[1:]) for i in range(3) for q in queries]
    decoder = ContinuousDecoder(model, cfg, slots=2, max_text=16, prefixes=store)
    results = {r.key: r.token_ids for r in decoder.run(reqs)}
    assert store.prefills == 3 and store.reuses == 6 and store.most_live == 1 and not store.held
    assert decoder.stats.admissions == 5  # 2 + 2 + 2 + 2 + 1: every freed slot took the next request
    for (i, q), ids in results.items():
        assert ids == plain(model, q, imgs[i], cfg).token_ids[0], (i, q)


def test_with_one_request_per_image_no_prefix_outlives_its_copy(model, golden_dir):
    """One request per image: a prefix is copied into its slot and freed before the next image's prefix is
    made and before the prompts are prefilled, so the planner counts no held prefix (`shares_prefixes`)."""
    import weakref

    imgs = _two_images(golden_dir)
    imgs.append(imgs[0].transpose(0))
    feats = model.encode_images(torch.stack([model.preprocess(i) for i in imgs]))
    made: list[weakref.ref] = []

    def make(i):
        assert not [r for r in made if r() is not None], "an earlier prefix is still alive"
        prefix = prefill_prefixes(model, feats[i : i + 1])[0]
        made.append(weakref.ref(prefix.k[0]))
        return prefix

    prefill = ContinuousDecoder._prefill

    def prefill_checked(self, start, stop):
        assert not [r for r in made if r() is not None], "a copied prefix is alive during the prompt prefill"
        return prefill(self, start, stop)

    cfg = GenerationConfig(max_new_tokens=3, stop_token_ids=())
    reqs = [DecodeRequest(i, i, model.build_inputs(None, "Colors?").input_ids[1:]) for i in range(3)]
    decoder = ContinuousDecoder(model, cfg, slots=3, max_text=16, prefixes=PrefixStore(make))
    decoder._prefill = prefill_checked.__get__(decoder)
    assert len(decoder.run(reqs)) == 3 and len(made) == 3

"""The 8-bit KV cache (`kv_cache: int8`): its rounding bound, its memory, and generation with it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.config import CogVLMConfig
from cogbatch.model.decoding import ContinuousDecoder, DecodeRequest, PrefixStore, prefill_prefixes
from cogbatch.model.kvcache import KVCache, SlotKVCache, dequantize_int8, quantize_int8
from cogbatch.model.prompts import BatchInputs
from cogbatch.model.settings import GenerationConfig
from tests.golden import golden_configs, golden_root
from tests.unit.model.helpers import plain


@pytest.fixture(scope="module")
def model(tiny_cogvlm2):
    m = CogVLM.from_pretrained(
        tiny_cogvlm2, dtype="float32", device="cpu", quantization={"default": "none", "kv_cache": "int8"}
    )
    assert m.kv_cache == "int8" and m.load_report.quantization == "none"  # bf16/fp32 weights, int8 KV
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_within_half_a_step(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 50, 128) * torch.logspace(-3, 2, 50).view(1, 1, -1, 1)).to(dtype)
    x[0, 0, 0] = 0  # a zero vector: a zero scale, no NaN
    q, scale = quantize_int8(x, dtype)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (3, 4, 50, 1)
    back = dequantize_int8(q, scale)
    assert back.dtype == dtype and torch.equal(back[0, 0, 0], torch.zeros(128, dtype=dtype))
    err = (back.float() - x.float()).abs()
    # Half a step; in bf16 also the rounding of the product itself (8 significant bits).
    bound = scale.float() / 2 + (0 if dtype == torch.float32 else x.float().abs() * 2**-8)
    assert bool((err <= bound * (1 + 1e-6)).all())
    assert float(q.abs().max()) == 127  # the absmax of each vector maps to the full range


def test_int8_cache_stores_half_the_bytes(tiny_cogvlm2):
    cfg = CogVLMConfig.from_json(tiny_cogvlm2)
    dense = SlotKVCache(cfg, 4, 300, torch.bfloat16, torch.device("cpu"))
    small = SlotKVCache(cfg, 4, 300, torch.bfloat16, torch.device("cpu"), "int8")
    assert small.k[0].dtype == small.v[0].dtype == torch.int8 and small.k_scale[0].dtype == torch.bfloat16
    per_vector = cfg.head_dim + 2  # int8 values + one bf16 scale, against 2 bytes per value
    assert small.nbytes() * 2 * cfg.head_dim == dense.nbytes() * per_vector
    with pytest.raises(ValueError, match="kv_dtype"):
        KVCache(cfg, 1, 8, torch.float32, torch.device("cpu"), "int4")


def test_slot_writes_read_back_within_the_bound(tiny_cogvlm2):
    cfg = CogVLMConfig.from_json(tiny_cogvlm2)
    cache = SlotKVCache(cfg, 3, 20, torch.float32, torch.device("cpu"), "int8")
    cache.lengths[:] = torch.tensor([5, 0, 9])
    cache.select(1, 3)
    k = torch.randn(2, cfg.num_key_value_heads, 4, cfg.head_dim)
    keys, values = cache.update(0, k, -k)
    for row, start in ((0, 0), (1, 9)):
        got = keys[row, :, start : start + 4]
        step = k[row].abs().amax(-1, keepdim=True) / 127
        assert bool(((got - k[row]).abs() <= step / 2 + 1e-7).all())
        assert torch.equal(values[row, :, start : start + 4], -got)
    cache.advance(4)
    cache.move(2, 0)  # scales travel with their values
    assert torch.equal(cache.k_scale[0][0, :, :13], cache.k_scale[0][2, :, :13])


def test_greedy_golden_outputs_with_an_int8_cache(golden_dir):
    """Same tokens as the reference; logits off by the cache's rounding, far less than a wrong scale would make."""
    for path in golden_configs():
        path = golden_dir / path.relative_to(golden_root())
        m = CogVLM.from_pretrained(path, dtype="float32", device="cpu", quantization="none+kv8")
        c = load_file(path / "cases.safetensors")
        batch = BatchInputs(c["a_input_ids"], c["a_token_type_ids"], c["a_attention_mask"], c["a_images"])
        n = c["b_new_tokens"].shape[1]
        out = m.generate(batch, GenerationConfig(max_new_tokens=n, stop_token_ids=()), return_logits=True)
        assert out.token_ids[0] == c["b_new_tokens"][0].tolist(), path
        ref = c["b_step_logits"]
        rel = float((out.step_logits[0] - ref).abs().max() / ref.abs().max())
        assert 1e-6 < rel <= 0.02, (path, rel)  # measured 0.003 (cogvlm1) and 0.004 (cogvlm2)


def test_continuous_decoder_equals_generate_with_an_int8_cache(model, golden_dir):
    from PIL import Image

    imgs = [Image.open(golden_dir / "images" / n) for n in ("img_a_rgb_150x97.png", "img_c_palette_57x33.png")]
    feats = {i: model.encode_images(model.preprocess(img)[None]) for i, img in enumerate(imgs)}
    store = PrefixStore(lambda i: prefill_prefixes(model, feats[i])[0])
    prefix = prefill_prefixes(model, feats[0])[0]
    assert prefix.k[0].dtype == torch.int8 and prefix.k_scale[0].shape == (*prefix.k[0].shape[:2], 1)
    queries = ["Describe this image.", "Colors?", "Write a caption, please."]
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    reqs = [DecodeRequest((i, q), i, model.build_inputs(None, q).input_ids[1:]) for i in range(2) for q in queries]
    decoder = ContinuousDecoder(model, cfg, slots=2, max_text=32, prefixes=store)
    assert decoder.cache.quantized
    for r in decoder.run(reqs):
        i, q = r.key
        assert r.token_ids == plain(model, q, imgs[i], cfg).token_ids[0], r.key


def test_a_prefix_of_another_cache_dtype_is_refused(model, tiny_cogvlm2):
    prefix = prefill_prefixes(model, torch.zeros(1, model.config.vision_tokens, model.config.hidden_size))[0]
    dense = SlotKVCache(model.config, 1, 2 * prefix.length, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"a prefix stored torch\.int8 in a torch\.float32 KV cache"):
        dense.load_prefix(0, prefix.planes())


def test_the_worker_plans_with_the_models_kv_cache(model):
    from cogbatch.planning.memory import memory_model_for

    mm = memory_model_for(model)
    c = model.config
    assert mm.kv_dtype == "int8"
    assert mm.kv_per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * (c.head_dim + 4)  # fp32 scales


def test_one_pass_logits_are_those_generation_computes_with_an_int8_cache(model, golden_dir):
    """`logits` (what `compare` teacher-forces with) rounds keys and values as the cache does."""
    from PIL import Image

    image = Image.open(golden_dir / "images" / "img_a_rgb_150x97.png")
    batch = model.collate([model.build_inputs(None, "Describe this image.", image)])
    out = model.generate(batch, GenerationConfig(max_new_tokens=6, stop_token_ids=()), return_logits=True)
    ids = torch.tensor([out.token_ids[0][:-1]])
    full = BatchInputs(
        torch.cat([batch.input_ids, ids], 1),
        torch.cat([batch.token_type_ids, torch.zeros_like(ids)], 1),
        torch.cat([batch.attention_mask, torch.ones_like(ids)], 1),
        batch.images,
    )
    forced = model.logits(full.input_ids, full.token_type_ids, full.attention_mask, full.images, last=6)[0]
    step = out.step_logits[0]
    assert float((forced - step).abs().max()) <= 1e-4 * float(step.abs().max())
    model.kv_cache = "none"
    try:
        dense = model.logits(full.input_ids, full.token_type_ids, full.attention_mask, full.images, last=6)[0]
    finally:
        model.kv_cache = "int8"
    assert float((dense - step).abs().max()) > 10 * float((forced - step).abs().max())  # the cache's rounding shows

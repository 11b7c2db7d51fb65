"""The worker's generation path: one vision pass per image, continuous batching, OOM splits, loops."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from cogbatch.config import load_job
from cogbatch.manifest import build_entries, expand_requests
from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.engine import DecodeEngine, EngineRequest, encode_prefixes
from cogbatch.model.generate import GenerationConfig, looping_tail
from cogbatch.worker import Worker, load_entry
from tests.e2e.conftest import make_images

TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "template": "chat"},
    {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa"},
    {"name": "short", "prompt": "A short caption for {filename}, please.", "template": "base"},
    {"name": "count", "prompt": "How many shapes?", "template": "vqa"},
]


@pytest.fixture(scope="module")
def model(tiny_cogvlm2):
    return CogVLM.from_pretrained(tiny_cogvlm2, dtype="float32", device="cpu")


def _job(tmp_path, model_dir, n_images, **keys):
    make_images(tmp_path / "images", n_images)
    job = {
        "model": str(model_dir),
        "input": {"folder": str(tmp_path / "images")},
        "output": str(tmp_path / "out"),
        "quantization": "none",
        "device": "cpu",
        "dtype": "fp32",
        "generation": {"max_new_tokens": 6},
        "tasks": TASKS,
        **keys,
    }
    cfg = load_job(job, pipeline=None)
    requests = expand_requests(build_entries(cfg), cfg, {t.name: "fp" for t in cfg.tasks})
    return cfg, requests


def _chunk(cfg, requests, image_size):
    by_image = {}
    for r in requests:
        by_image.setdefault(r.image.image_id, (r.image, []))[1].append(r)
    return [(load_entry(entry, cfg, image_size, None), reqs) for entry, reqs in by_image.values()]


def _solo(model, req, pixels, max_new=6, **gen):
    sample = model.build_inputs(None, req.prompt, pixels, req.task.template)
    return model.generate(model.collate([sample]), GenerationConfig(max_new_tokens=max_new, **gen))


@pytest.mark.slow
def test_sixteen_images_four_tasks_encode_each_image_once(tmp_path, model, tiny_cogvlm2):
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 16, batch_size=5, generation={"max_new_tokens": 4})
    worker = Worker(cfg, "run-1", model=model)
    chunk = _chunk(cfg, requests, worker.image_size)
    rows = worker.process(chunk)
    stats = worker.summary_stats()
    assert stats["vision_encodes"] == 16
    assert stats["prefix_reuses"] == 16 * 3
    assert stats["requests"] == 64 and len(rows) == 64
    assert 1 < stats["mean_batch_size"] <= 5
    assert {r["status"] for r in rows} == {"ok"}
    pixels = {img.entry.image_id: img.pixels for img, _ in chunk}
    by_key = {(r["image_id"], r["task"]): r for r in rows}
    for req in requests:  # the texts of running each request alone, through the plain generate()
        solo = _solo(model, req, pixels[req.image.image_id], max_new=4)
        row = by_key[(req.image.image_id, req.task.name)]
        assert row["tokens_out"] == len(solo.token_ids[0])
        assert row["text"] == solo.texts[0].strip()
        assert row["tokens_in"] == solo.prompt_tokens[0]


def test_out_of_memory_splits_the_batch_and_loses_nothing(tmp_path, model, tiny_cogvlm2, monkeypatch):
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 6, batch_size=6)
    reference = Worker(cfg, "ref", model=model).process(_chunk(cfg, requests, model.config.vision.image_size))

    real_step, real_encode = DecodeEngine._step, model.encode_images

    def step(self):
        if len(self.active) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_step(self)

    def encode(pixels):
        if pixels.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_encode(pixels)

    monkeypatch.setattr(DecodeEngine, "_step", step)
    monkeypatch.setattr(model, "encode_images", encode)
    worker = Worker(cfg, "oom", model=model)
    rows = worker.process(_chunk(cfg, requests, worker.image_size))
    stats = worker.summary_stats()
    assert stats["oom_splits"] >= 2 and stats["vision_encodes"] == 6
    key = lambda r: (r["image_id"], r["task"])  # noqa: E731
    assert len(rows) == len({key(r) for r in rows}) == 24
    assert {key(r): r["text"] for r in rows} == {key(r): r["text"] for r in reference}


def test_a_request_that_never_fits_becomes_an_error_row(tmp_path, model, tiny_cogvlm2, monkeypatch):
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 2, tasks=TASKS[:1])
    victim = requests[0].prompt

    real_forward = DecodeEngine._forward

    def forward(self, tokens, positions):
        if any(r.key[0] is requests[0] for r in self.admitting):  # the victim's prompt prefill
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(self, tokens, positions)

    monkeypatch.setattr(DecodeEngine, "_forward", forward)
    rows = Worker(cfg, "oom", model=model).process(_chunk(cfg, requests, model.config.vision.image_size))
    by_id = {r["image_id"]: r for r in rows}
    bad = by_id[requests[0].image.image_id]
    assert bad["status"] == "error" and "out of memory" in bad["error"] and "GiB vram_ceiling" in bad["error"]
    assert bad["prompt"] == victim
    assert by_id[requests[1].image.image_id]["status"] == "ok"


def test_continuous_refill_matches_each_request_alone(model, golden_dir):
    """Sequences finishing at different times hand their slot to waiting requests."""
    from PIL import Image

    imgs = [Image.open(golden_dir / "images" / n) for n in ("img_a_rgb_150x97.png", "img_c_palette_57x33.png")]
    prefixes = encode_prefixes(model, torch.stack([model.preprocess(i) for i in imgs]))
    queries = ["Describe this image.", "What is in the picture?", "Colors?", "Write a caption, please.", "Shapes?"]
    free = GenerationConfig(max_new_tokens=8, stop_token_ids=())
    probe = [_plain(model, q, imgs[0], free).token_ids[0] for q in queries]
    stop = probe[0][2]  # a token some sequences emit early and others late or never
    cfg = GenerationConfig(max_new_tokens=8, stop_token_ids=(stop,))
    reqs = [
        EngineRequest((i, q), prefixes[i], model.build_inputs(None, q).input_ids[1:])
        for i in range(2)
        for q in queries
    ]
    engine = DecodeEngine(model, cfg, slots=3, max_text=32)
    results = {r.key: r for r in engine.run(reqs)}
    lengths = set()
    for (i, q), r in results.items():
        alone = _plain(model, q, imgs[i], cfg)
        assert r.token_ids == alone.token_ids[0] and r.finish_reason == alone.finish_reasons[0]
        lengths.add(len(r.token_ids))
    assert len(lengths) > 1  # really different lengths ...
    assert engine.stats.admissions > len(reqs) / 3  # ... so slots were refilled mid-flight


def _plain(model, query, image, cfg):
    return model.generate(model.collate([model.build_inputs(None, query, image)]), cfg)


@contextmanager
def stuck_on(model, token):
    """The model always prefers `token`: a model stuck in a loop. (monkeypatch would delete a submodule.)"""
    original = model.lm_head
    head = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    head.weight = original.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token] = 1e4
    model.lm_head = head
    try:
        yield
    finally:
        model.lm_head = original


def test_loops_stop_early_and_are_retried(tmp_path, model, tiny_cogvlm2):
    task = {"name": "cap", "prompt": "Describe.", "max_new_tokens": 40, "retry_on_repetition": 2}
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 1, tasks=[task])
    worker = Worker(cfg, "loop", model=model)
    with stuck_on(model, 1234):
        (row,) = worker.process(_chunk(cfg, requests, worker.image_size))
    assert row["finish_reason"] == "repetition"
    assert row["tokens_out"] == 16  # stopped at the first detectable loop, not after 40 tokens
    assert row["attempts"] == 3 and worker.summary_stats()["repetition_retries"] == 2


def test_no_repeat_ngram_size_bans_repeats(model, golden_dir):
    from PIL import Image

    img = Image.open(golden_dir / "images" / "img_a_rgb_150x97.png")
    cfg = GenerationConfig(max_new_tokens=6, no_repeat_ngram_size=1, stop_token_ids=())
    with stuck_on(model, 1234):
        out = _plain(model, "Describe.", img, cfg)
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

    from cogbatch.model.tiny import write_tiny_checkpoint

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
    results = DecodeEngine(model, cfg, slots=2, max_text=len(ids)).run(
        [EngineRequest(i, p, ids) for i, p in enumerate(prefixes)]
    )
    assert sorted(len(r.token_ids) for r in results) == [4, 4]

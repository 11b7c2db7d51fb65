"""`cogbatch.worker`: one vision pass per image, continuous batching, OOM splits, loops, placement, rows."""

from __future__ import annotations

import pytest
import torch

import cogbatch.model.decoding as decoding_module
from cogbatch.inputs.pending import build_entries, expand_requests
from cogbatch.job import load_job
from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.decoding import ContinuousDecoder
from cogbatch.model.kvcache import SlotKVCache
from cogbatch.model.settings import GenerationConfig
from cogbatch.worker.loading import load_entry
from cogbatch.worker.rows import postprocess
from cogbatch.worker.worker import ModelWorker
from tests.e2e.conftest import make_images
from tests.unit.model.helpers import stuck_on


@pytest.fixture(scope="module")
def model(tiny_cogvlm2):
    return CogVLM.from_pretrained(tiny_cogvlm2, dtype="float32", device="cpu")


TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "template": "chat"},
    {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa"},
    {"name": "short", "prompt": "A short caption for {filename}, please.", "template": "base"},
    {"name": "count", "prompt": "How many shapes?", "template": "vqa"},
]


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
    worker = ModelWorker(cfg, "run-1", model=model)
    chunk = _chunk(cfg, requests, worker.image_size)
    rows = worker.process(chunk)
    stats = worker.summary_stats()
    assert stats.vision_encodes == 16
    assert stats.prefix_reuses == 16 * 3
    assert stats.requests == 64 and len(rows) == 64
    assert 1 < stats.mean_batch_size <= 5
    assert stats.model_compute_s > 0
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
    reference = ModelWorker(cfg, "ref", model=model).process(_chunk(cfg, requests, model.config.vision.image_size))

    real_step, real_encode = ContinuousDecoder._step, model.encode_images

    def step(self):
        if len(self.active) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_step(self)

    def encode(pixels):
        if pixels.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_encode(pixels)

    monkeypatch.setattr(ContinuousDecoder, "_step", step)
    monkeypatch.setattr(model, "encode_images", encode)
    worker = ModelWorker(cfg, "oom", model=model)
    assert worker.plan.slots == 6 and worker.plan.encode_batch == 6
    chunk = _chunk(cfg, requests, worker.image_size)
    reported = []
    rows = worker.process(chunk, on_row=reported.append)
    stats = worker.summary_stats()
    assert stats.oom_splits >= 2 and stats.vision_encodes == 6
    assert stats.requests == 24  # each request once, however often it was retried
    key = lambda r: (r["image_id"], r["task"])  # noqa: E731
    assert len(rows) == len({key(r) for r in rows}) == 24
    assert sorted(map(key, reported)) == sorted(map(key, rows))  # each row reported once, retries or not
    assert {key(r): r["text"] for r in rows} == {key(r): r["text"] for r in reference}
    # The rest of the run is planned smaller: the same work again runs without a single failure.
    assert worker.plan.slots <= 2 and worker.plan.encode_batch == 1 and stats.planned_batch <= 2
    again = worker.process(chunk)
    assert worker.summary_stats().oom_splits == stats.oom_splits
    assert {key(r): r["text"] for r in again} == {key(r): r["text"] for r in reference}


def test_each_row_is_reported_as_its_request_finishes_not_with_the_chunk(tmp_path, model, tiny_cogvlm2, monkeypatch):
    """What moves a progress bar per image: `on_row` comes while the chunk is still being decoded."""
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 6, batch_size=2, generation={"max_new_tokens": 4})
    (tmp_path / "images" / "img_005.png").write_bytes(b"not a png")  # an error row, reported before any decoding
    steps = []
    real_step = ContinuousDecoder._step
    monkeypatch.setattr(ContinuousDecoder, "_step", lambda self: (steps.append(1), real_step(self))[1])
    worker = ModelWorker(cfg, "each", model=model)
    at_step = []
    rows = worker.process(_chunk(cfg, requests, worker.image_size), on_row=lambda row: at_step.append(len(steps)))
    assert len(at_step) == len(rows) == 24 and sum(r["status"] == "error" for r in rows) == 4
    assert at_step == sorted(at_step) and at_step[0] == 0  # the error rows first, then as sequences retire
    assert len(set(at_step)) > 6  # spread over the decoding, not all at its end
    assert at_step.count(len(steps)) < len(rows) // 2


def test_out_of_memory_allocating_the_slot_cache_splits_and_loses_nothing(tmp_path, model, tiny_cogvlm2, monkeypatch):
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 2, batch_size=4)
    reference = ModelWorker(cfg, "ref", model=model).process(_chunk(cfg, requests, model.config.vision.image_size))

    def cache(model_cfg, slots, *args):
        if slots > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return SlotKVCache(model_cfg, slots, *args)

    monkeypatch.setattr(decoding_module, "SlotKVCache", cache)
    worker = ModelWorker(cfg, "oom", model=model)
    rows = worker.process(_chunk(cfg, requests, worker.image_size))
    key = lambda r: (r["image_id"], r["task"])  # noqa: E731
    assert worker.summary_stats().oom_splits == 2  # 4 slots, then 2, then 1
    assert len(rows) == len({key(r) for r in rows}) == 8
    assert {key(r): r["text"] for r in rows} == {key(r): r["text"] for r in reference}


def test_a_slot_cache_that_never_fits_gives_one_error_row_per_request(tmp_path, model, tiny_cogvlm2, monkeypatch):
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 2, batch_size=4)

    def cache(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(decoding_module, "SlotKVCache", cache)
    rows = ModelWorker(cfg, "oom", model=model).process(_chunk(cfg, requests, model.config.vision.image_size))
    wanted = sorted((r.image.image_id, r.task.name) for r in requests)
    assert sorted((r["image_id"], r["task"]) for r in rows) == wanted
    assert {r["status"] for r in rows} == {"error"} and all("GiB vram_ceiling" in r["error"] for r in rows)


def test_a_request_that_never_fits_becomes_an_error_row(tmp_path, model, tiny_cogvlm2, monkeypatch):
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 2, tasks=TASKS[:1])
    victim = requests[0].prompt

    real_prefill = ContinuousDecoder._prefill

    def prefill(self, start, stop):
        if any(s.request.key[0] is requests[0] for s in self.active[start:stop]):  # the victim's prompt
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_prefill(self, start, stop)

    monkeypatch.setattr(ContinuousDecoder, "_prefill", prefill)
    rows = ModelWorker(cfg, "oom", model=model).process(_chunk(cfg, requests, model.config.vision.image_size))
    by_id = {r["image_id"]: r for r in rows}
    bad = by_id[requests[0].image.image_id]
    assert bad["status"] == "error" and "out of memory" in bad["error"] and "GiB vram_ceiling" in bad["error"]
    assert bad["prompt"] == victim
    assert by_id[requests[1].image.image_id]["status"] == "ok"


def test_loops_stop_early_and_are_retried(tmp_path, model, tiny_cogvlm2):
    task = {"name": "cap", "prompt": "Describe.", "max_new_tokens": 40, "retry_on_repetition": 2}
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 1, tasks=[task])
    worker = ModelWorker(cfg, "loop", model=model)
    with stuck_on(model, 1234):
        (row,) = worker.process(_chunk(cfg, requests, worker.image_size))
    assert row["finish_reason"] == "repetition"
    assert row["tokens_out"] == 16  # stopped at the first detectable loop, not after 40 tokens
    assert row["attempts"] == 3 and worker.summary_stats().repetition_retries == 2
    assert worker.stats.prefix_prefills == 1  # the retries restart in their slot, from the same prefix


def test_a_chunk_holds_more_requests_than_slots_and_freed_slots_are_refilled(tmp_path, model, tiny_cogvlm2):
    """One task per image still refills: a chunk carries at least two requests per decode slot."""
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 6, batch_size=2, tasks=TASKS[:1])
    worker = ModelWorker(cfg, "refill", model=model)
    assert worker.plan.slots == 2 and worker.chunk_images >= 2 * worker.plan.slots
    chunk = _chunk(cfg, requests, worker.image_size)[: worker.chunk_images]  # what a runner hands over
    assert len(chunk) == 6
    rows = worker.process(chunk)
    stats = worker.summary_stats()
    assert stats.requests == 6 and stats.vision_encodes == 6
    assert stats.batches == 3 and stats.mean_batch_size == 2.0  # three admissions into two slots
    pixels = {img.entry.image_id: img.pixels for img, _ in chunk}
    by_key = {(r["image_id"], r["task"]): r for r in rows}
    for req in requests:
        solo = _solo(model, req, pixels[req.image.image_id])
        assert by_key[(req.image.image_id, req.task.name)]["text"] == solo.texts[0].strip()


def test_tasks_with_different_settings_share_one_engine_and_each_image_prefix(tmp_path, model, tiny_cogvlm2):
    tasks = [
        {**TASKS[0], "max_new_tokens": 3},
        {**TASKS[1], "max_new_tokens": 7, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    ]
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 3, batch_size=4, tasks=tasks)
    worker = ModelWorker(cfg, "mixed", model=model)
    chunk = _chunk(cfg, requests, worker.image_size)
    rows = worker.process(chunk)
    stats = worker.summary_stats()
    assert stats.vision_encodes == 3 and stats.prefix_reuses == 3 and worker.stats.prefix_prefills == 3
    pixels = {img.entry.image_id: img.pixels for img, _ in chunk}
    by_key = {(r["image_id"], r["task"]): r for r in rows}
    gen = {"caption": {}, "colors": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}}
    for req in requests:
        max_new = req.task.generation.max_new_tokens
        solo = _solo(model, req, pixels[req.image.image_id], max_new=max_new, **gen[req.task.name])
        row = by_key[(req.image.image_id, req.task.name)]
        assert (row["text"], row["tokens_out"]) == (solo.texts[0].strip(), len(solo.token_ids[0]))


def test_prompts_longer_than_assumed_are_planned_for(tmp_path, model, tiny_cogvlm2):
    long_prompt = "Describe " + "every shape and every color " * 40 + "in this image."
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 1, tasks=[{"name": "long", "prompt": long_prompt}])
    worker = ModelWorker(cfg, "long", model=model)
    planned = worker.plan.max_text
    (row,) = worker.process(_chunk(cfg, requests, worker.image_size))
    assert row["status"] == "ok"
    prompt_tokens = row["tokens_in"] - model.config.vision_tokens - 2  # minus bos and the image tokens
    assert prompt_tokens > planned and worker.plan.max_text >= prompt_tokens


def test_phase_swap_moves_exactly_the_idle_part_off_the_device(tmp_path, model, tiny_cogvlm2, monkeypatch):
    """Swap mode on a (pretend) GPU: the vision phase has only the vision tower on the device, the
    language phase everything but it; modules the loader left in host memory never move."""
    import dataclasses

    import cogbatch.model.quant.linear as quant_linear

    cfg, _ = _job(tmp_path, tiny_cogvlm2, 1)
    worker = ModelWorker(cfg, "swap", model=model)
    gpu, cpu = torch.device("meta"), torch.device("cpu")  # "meta": an accelerator that nothing reaches
    where = {id(p): cpu for p in model.parameters()}  # where each parameter would be

    def move(module, device):
        for p in module.parameters():
            where[id(p)] = torch.device(device)

    monkeypatch.setattr(quant_linear, "move_module", move)
    worker.placement.device = gpu
    worker.placement.host_modules = {id(model.model.embed_tokens)}  # as with embeddings_on_cpu
    worker.plan = dataclasses.replace(worker.plan, mode="swap")
    vision = {id(p) for p in model.model.vision.parameters()}
    on_host = {id(p) for p in model.model.embed_tokens.parameters()}

    def on_device():
        return {k for k, d in where.items() if d == gpu}

    everything = set(where)
    worker._place("vision")
    assert on_device() == vision
    worker._place("language")
    assert on_device() == everything - vision - on_host
    worker._place("vision")
    assert on_device() == vision
    worker.plan = dataclasses.replace(worker.plan, mode="resident")  # a later plan without swapping
    worker._place("language")
    assert on_device() == everything - on_host


def test_the_first_chunk_calibrates_the_plan_from_each_phase(tmp_path, model, tiny_cogvlm2, monkeypatch):
    """What CUDA would report (faked here): the language phase used far more than predicted, so
    later chunks are planned smaller; peak statistics are measured (and reset) in the first chunk only."""
    import cogbatch.worker.worker as worker_module

    GiB = 2**30
    meters = []

    class Meter:  # stands in for `torch.cuda` peak statistics
        def __init__(self, device, peak):
            self.peak = peak
            meters.append(self)

        def stop(self):
            measured = (30 * GiB if len(meters) % 2 == 0 else 1) if self.peak else None  # language, vision
            return 0.25, measured

    monkeypatch.setattr(worker_module, "DeviceMeter", Meter)
    cfg, requests = _job(tmp_path, tiny_cogvlm2, 2, batch_size=6)
    worker = ModelWorker(cfg, "calibrate", model=model)
    before = worker.plan.slots
    chunk = _chunk(cfg, requests, worker.image_size)
    worker.process(chunk)
    assert worker.calibrated and worker.memory.correction > 1
    assert worker.plan.slots < before and worker.summary_stats().model_compute_s == 0.5
    worker.process(chunk)
    assert [m.peak for m in meters] == [True, True, False, False]


def test_max_new_tokens_past_the_models_context_is_warned_about(tmp_path, model, tiny_cogvlm2, caplog):
    context = model.config.max_position_embeddings
    within, _ = _job(tmp_path / "a", tiny_cogvlm2, 1, generation={"max_new_tokens": 8})
    past, _ = _job(tmp_path / "b", tiny_cogvlm2, 1, generation={"max_new_tokens": context})
    with caplog.at_level("WARNING", logger="cogbatch"):
        ModelWorker(within, "ok", model=model)
        assert "context" not in caplog.text
        ModelWorker(past, "long", model=model)
    assert f"max_new_tokens {context}: an image" in caplog.text and f"context of {context} tokens" in caplog.text


@pytest.mark.parametrize(
    "text, prefixes, expected",
    [
        ("  The image shows a red square. ", ("The image shows",), "A red square."),
        ("this image depicts: two dogs", ("The image shows", "This image depicts"), "Two dogs"),
        ("A cat on a mat.", ("The image shows",), "A cat on a mat."),
        ("\n trailing space \t", (), "trailing space"),
    ],
)
def test_postprocess_strips_configured_openings_and_whitespace(text, prefixes, expected):
    assert postprocess(text, prefixes) == expected


def test_the_ceiling_is_lowered_to_what_the_gpu_can_still_give(monkeypatch, caplog):
    """An 8 GiB card (or one shared with another process) under the default 11 GiB vram_ceiling: the
    plan uses free + what cogbatch already holds, and says so; a ceiling within reach is kept."""
    import torch

    from cogbatch.worker.placement import usable_ceiling

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(1.5 * gib), 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)  # the weights
    cuda = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="cogbatch"):
        assert usable_ceiling(11 * gib, cuda) == int(7.5 * gib)
    assert "vram_ceiling 11.00 GiB is more than this process can use on cuda:0 (7.50 GiB" in caplog.text
    caplog.clear()
    assert usable_ceiling(7 * gib, cuda) == 7 * gib
    assert usable_ceiling(11 * gib, torch.device("cpu")) == 11 * gib
    assert not caplog.text


def test_weights_that_cannot_leave_the_gpu_are_never_planned_to_swap(tmp_path, model, tiny_cogvlm2, monkeypatch):
    """quanto's AWQ weights (fp16 int4 on sm80+) cannot be moved off the GPU: a run with them is planned
    resident only, so neither the first plan nor a later one (calibration, out of memory) swaps phases."""
    import cogbatch.worker.worker as worker_module
    from cogbatch.errors import DoesNotFit

    cfg, _ = _job(tmp_path, tiny_cogvlm2, 2)
    mm = ModelWorker(cfg, "probe", model=model).memory
    resident = max(mm.decode_peak(1, 128, 6, True), mm.encode_peak(1, True))
    swapped = max(mm.decode_peak(1, 128, 6, False), mm.encode_peak(1, False))
    assert swapped < resident
    tight, _ = _job(tmp_path, tiny_cogvlm2, 2, vram_ceiling=(swapped + resident) // 2)
    assert ModelWorker(tight, "movable", model=model).plan.mode == "swap"

    monkeypatch.setattr(worker_module, "weights_stay_on_device", lambda m: True)
    with pytest.raises(DoesNotFit, match=r"AWQ kernel, whose weights cannot leave the GPU: use dtype: bf16"):
        ModelWorker(tight, "pinned", model=model)
    roomy, _ = _job(tmp_path, tiny_cogvlm2, 2, vram_ceiling=resident + 2**20)
    worker = ModelWorker(roomy, "pinned", model=model)
    assert worker.plan.mode == "resident"
    worker.memory.correction = 1.5  # calibration found more than predicted: no plan fits any more ...
    worker._replan()
    assert (worker.plan.mode, worker.plan.slots) == ("resident", 1)  # ... one request at a time, never swapped

"""CI runs the GPU path: the real loader, ModelWorker.process and the decoder on fake CUDA tensors, small shapes.

Both generations, sm86 bf16 and sm75 fp16, int4 and int8, phase-swapped and resident; each run
asserts the rows, the kernel classes the loader must pick on that device, and where the weights
are while each phase runs. A device, dtype or packing bug in CUDA-only code fails here.
"""

import os

import pytest
import torch

from cogbatch.dryrun import TraceConfig, trace
from cogbatch.dryrun.config import small_config
from cogbatch.dryrun.kernels import KernelCheckError

GiB = 2**30

# (model, capability, dtype, quantization, mode): every pair of generation x device covers int4 and
# int8, swap and resident at least once.
RUNS = [
    ("cogvlm2", (8, 6), "bf16", "int4", "swap"),
    ("cogvlm2", (8, 6), "bf16", "int8", "resident"),
    ("cogvlm2", (7, 5), "fp16", "int4", "resident"),
    ("cogvlm2", (7, 5), "fp16", "int8", "swap"),
    ("cogvlm", (8, 6), "bf16", "int4", "resident"),
    ("cogvlm", (8, 6), "bf16", "int8", "swap"),
    ("cogvlm", (7, 5), "fp16", "int4", "swap"),
    ("cogvlm", (7, 5), "fp16", "int8", "resident"),
]
# What the loader must choose (quant_pack.optimize_weight): TinyGemm for bf16 group 128 from sm80 on;
# before sm80 quanto has no fused int4 kernel, the portable class dequantizes per call.
KERNEL_CLASS = {
    ((8, 6), "bf16", "int4"): "TinyGemmWeightQBitsTensor",
    ((7, 5), "fp16", "int4"): "WeightQBitsTensor",
    ((8, 6), "bf16", "int8"): "WeightQBytesTensor",
    ((7, 5), "fp16", "int8"): "WeightQBytesTensor",
}


def small(model, **kw):
    kw = {"batch": 2, "images": 2, "tasks": 1, "new_tokens": 2, **kw}
    return TraceConfig(model=model, config=small_config(model), **kw)


@pytest.mark.parametrize(("model", "capability", "dtype", "quant", "mode"), RUNS, ids=lambda v: str(v))
def test_gpu_path_runs(model, capability, dtype, quant, mode):
    r = trace(small(model, capability=capability, dtype=dtype, quantization=quant, mode=mode))
    assert r["rows_ok"] == r["rows"] == 2, r["row_errors"]
    assert r["tokens_out"] == [2, 2]
    assert r["plan"]["mode"] == mode
    assert r["kernels"] == {KERNEL_CLASS[capability, dtype, quant]: 33}  # every planned Linear
    ops = r["int4_ops"]
    if r["kernels"].get("TinyGemmWeightQBitsTensor"):
        assert ops["_convert_weight_to_int4pack"] > 0 and ops["_weight_int4pack_mm"] > 0
    else:
        assert not ops, "no int4 kernel exists for this device: the CUDA TinyGemm ops must not run"
    if quant == "int8":
        assert r["quanto_ops"].get("qbytes_mm", 0) > 0  # quanto's CUDA int8 path: dequantize + matmul
    sdpa = r["sdpa_by_phase"]
    assert set(sdpa["vision_encode"]) == ({"flash"} if capability >= (8, 0) else {"efficient"})
    # The decoder's additive slot mask rules out flash; CogVLM2's grouped KV heads, which the efficient kernel
    # refuses, are folded into query rows (`language._grouped_attention`), so no step falls back to math.
    assert set(sdpa["decode"]) == set(sdpa["prompt_prefill"]) == {"efficient"}
    assert r["oom_events"] == 0
    assert r["peak_allocated_bytes"] <= r["peak_reserved_bytes"]
    # The worker's load asks CUDA's allocator for expandable segments unless the environment configures it.
    assert r["allocator_expandable"] == (not os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    # In swap mode the phase not running holds no device bytes; resident mode keeps every weight.
    vision, language = r["worker"]["weights"]["vision"], r["worker"]["weights"]["language"]
    at_vision = r["phases"]["vision_encode"]["start_exact"]  # live device bytes when the vision phase begins
    at_language = r["phases"]["slot_cache"]["start_exact"]  # ... when the language phase begins (before its cache)
    if mode == "swap":
        assert (at_vision, at_language) == (vision, language)
    else:
        assert at_vision == at_language == vision + language
    # A phase-swapped run loads with the vision tower parked in host memory: the load never holds both parts.
    assert r["load"]["vision_parked"] == (mode == "swap")
    assert r["load"]["weights_exact_bytes"] == (language if mode == "swap" else vision + language)


def test_fp16_on_sm80_gets_awq():
    """fp16 int4 on sm80+: quanto's AWQ kernel (its CUDA extension is there on a GPU), not the fallback."""
    r = trace(small("cogvlm", capability=(8, 6), dtype="fp16", mode="resident"))
    assert r["kernels"] == {"AWQWeightQBitsTensor": 33} and r["rows_ok"] == 2
    assert r["quanto_ops"]["gemm_f16i4_awq"] > 0


def test_fp16_on_sm80_phase_swap_is_refused_before_the_load():
    """quanto 0.2.7's AWQ weights cannot leave the GPU (AWQPackedTensor asserts a CUDA device, and its
    unflatten cannot parse the 'AWQPacking.V2' its flatten writes), so a run that must swap phases says so
    and names the way out before any weight is read, instead of failing in the middle of the load."""
    from cogbatch.errors import DoesNotFit

    with pytest.raises(DoesNotFit, match=r"AWQ kernel.*use dtype: bf16"):
        trace(small("cogvlm", capability=(8, 6), dtype="fp16", mode="swap"))


@pytest.mark.parametrize("mode", ["resident", "swap"])
def test_loader_memo_matches_tracing_every_layer(mode):
    """Replaying one traced Linear per shape gives the same bytes, peaks and kernel calls as tracing all
    (in swap mode too, where the traced vision Linears are parked as soon as they are made)."""
    memo = trace(small("cogvlm2", worker=False, mode=mode))
    full = trace(small("cogvlm2", worker=False, mode=mode, trace_every_layer=True))
    assert memo["load"]["replayed_layers"] > 0 and full["load"]["replayed_layers"] == 0
    for key in ("weights_exact_bytes", "weights_allocated_bytes", "kernels"):
        assert memo["load"][key] == full["load"][key]
    for key in ("peak_allocated", "peak_reserved", "peak_exact"):
        assert memo["phases"]["load"][key] == full["phases"]["load"][key]
    assert memo["int4_ops"] == full["int4_ops"]


def test_weights_match_the_planner_and_the_card_is_enforced():
    cfg = small("cogvlm", worker=False)
    r = trace(cfg)
    # The planner counts every weight; the traced device also holds the rotary frequencies (fp32, head_dim/2
    # per layer), which the checkpoint does not store.
    layers, head_dim = cfg.config["num_hidden_layers"], cfg.config["hidden_size"] // cfg.config["num_attention_heads"]
    assert r["load"]["weights_exact_bytes"] - r["load"]["planned_device_bytes"] == layers * head_dim // 2 * 4
    half = r["load"]["weights_exact_bytes"] // 2  # a card for half the weights
    assert trace(small("cogvlm", worker=False, card_bytes=half, context_bytes=0))["oom_events"] > 0
    with pytest.raises(torch.OutOfMemoryError):
        trace(small("cogvlm", worker=False, card_bytes=half, context_bytes=0, raise_oom=True))


def test_generate_and_expandable_segments_and_no_patch_left_behind():
    import importlib

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensor

    import cogbatch.model.decoding as decoding
    import cogbatch.model.quant.stream as stream
    from cogbatch.dryrun.patches import QUANTO_TYPE_CHECKED
    from cogbatch.model.cogvlm import CogVLM

    def patchable():
        return (F.scaled_dot_product_attention, decoding.ContinuousDecoder._step, stream.linear_builder,
                stream.make_pool, stream._checkpoint_tensors, FakeTensor.tolist,
                torch.cuda.memory_allocated)  # fmt: skip

    before = patchable()
    r = trace(small("cogvlm", generate=True, expandable_segments=True, new_tokens=2))
    assert r["generate"]["tokens"] == [2, 2] and r["rows_ok"] == 2
    assert r["phases"]["generate"]["peak_allocated"] <= r["phases"]["generate"]["peak_reserved"]
    assert patchable() == before
    assert not torch.cuda.is_available() and torch.version.cuda is None
    assert "to" not in CogVLM.__dict__ and "encode_images" in CogVLM.__dict__
    assert all("type" not in vars(importlib.import_module(m)) for m in QUANTO_TYPE_CHECKED)


def test_old_cuda_packing_api_fails(monkeypatch):
    """A CUDA-only packing bug: int32 codes (N, K), the layout torch < 2.5 took, instead of uint8 (N, K/2)."""
    from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

    def old_pack(cls, t):
        t = t.to(torch.int32).contiguous()
        if t.device.type == "cpu":
            return original(t)
        return cls(torch._convert_weight_to_int4pack(t, innerKTiles=2), t.size(), t.stride())

    original = TinyGemmPackedTensor.pack
    monkeypatch.setattr(TinyGemmPackedTensor, "pack", classmethod(old_pack))
    with pytest.raises(Exception, match="uint8"):
        trace(small("cogvlm2", worker=False))


def test_tinygemm_outside_sm80_fails(monkeypatch):
    """If the loader picked TinyGemm on sm75 (a wrong capability test), the CUDA kernel check refuses it."""
    import cogbatch.model.quant.pack as qp

    monkeypatch.setattr(qp, "_tinygemm_target", lambda w: w.qtype.bits == 4 and w._group_size == 128)
    with pytest.raises(KernelCheckError, match="sm80"):
        trace(small("cogvlm2", capability=(7, 5), dtype="bf16", worker=False))


def test_trace_config_refuses_bad_values():
    with pytest.raises(ValueError, match="model"):
        TraceConfig(model="llava")
    with pytest.raises(ValueError, match="batch"):
        TraceConfig(batch=0)
    with pytest.raises(ValueError, match="mode"):
        TraceConfig(mode="both")


def test_embeddings_auto_puts_the_table_in_host_memory_when_the_run_would_swap():
    """`embeddings_on_cpu: auto` (the default): the table stays on the device for a run that fits resident,
    and goes to host memory, decided before the load, for one whose ceiling would make it swap phases."""
    roomy = trace(small("cogvlm2"))
    assert roomy["load"]["embeddings_on_cpu"] is False and roomy["plan"]["mode"] == "resident"
    on_device = roomy["plan_from_config"]["variants"][0]["modes"]
    # a ceiling between what one request needs resident and phase-swapped, with the table on the device
    ceiling = (on_device["resident"]["peak_bytes_batch_1"] + on_device["swap"]["peak_bytes_batch_1"]) // 2
    tight = trace(small("cogvlm2", vram_ceiling=ceiling))
    assert tight["load"]["embeddings_on_cpu"] is True and tight["rows_ok"] == 2, tight["row_errors"]
    assert tight["plan_from_config"]["embeddings_on_cpu"] and tight["plan_from_config"]["embeddings_auto"]
    table = 2 * small_config("cogvlm2")["vocab_size"] * small_config("cogvlm2")["hidden_size"]  # bf16
    assert roomy["load"]["weights_exact_bytes"] - tight["load"]["weights_exact_bytes"] == table
    assert "emb-cpu" in tight["quantization"] and "emb-cpu" not in roomy["quantization"]
    kept = trace(small("cogvlm2", vram_ceiling=ceiling, embeddings_on_cpu=False))  # an explicit false is kept
    assert kept["load"]["embeddings_on_cpu"] is False


def test_short_decode_ends_each_request_early_with_the_cache_of_a_full_run():
    """`short_decode` (the planner grid's runs): 2 tokens per request, the decoder planned as for all of them."""
    full = trace(small("cogvlm", new_tokens=4))
    quick = trace(small("cogvlm", new_tokens=4, short_decode=True, card_from_plan=True))
    assert full["tokens_out"] == [4, 4] and quick["tokens_out"] == [2, 2]
    assert quick["phases"]["decode"]["calls"] < full["phases"]["decode"]["calls"]
    assert quick["phases"]["slot_cache"]["growth"] == full["phases"]["slot_cache"]["growth"] > 0  # sized for 4
    assert quick["planned_peak_bytes"] == full["planned_peak_bytes"]
    # `card_from_plan`: after planning, the card is exactly the plan's peak, and the plan fits it
    assert quick["device"]["capacity_bytes"] == quick["planned_peak_bytes"] < full["device"]["capacity_bytes"]
    assert quick["oom_events"] == 0 and quick["peak_reserved_bytes"] <= quick["planned_peak_bytes"]


@pytest.mark.parametrize(("ceiling", "mode"), [(600 * 2**20, "swap"), (None, "resident")])
def test_cogbatch_load_swaps_phases_as_the_worker_does(ceiling, mode):
    """`cogbatch.load` + `VLM.generate` on the GPU path: at a ceiling where the planner picks phase swapping,
    the load parks the vision tower and the phase not running holds no device bytes; every device figure is
    the one `load_model` + `ModelWorker.process` give for the same settings."""
    # the table on the device: in host memory (auto's choice at 600 MiB) the small model would fit resident
    kw = {"batch": 4, "images": 4, "tasks": 2, "vram_ceiling": ceiling, "embeddings_on_cpu": False}
    api = trace(small("cogvlm2", api=True, **kw))
    assert api["rows_ok"] == api["rows"] == 8 and api["tokens_out"] == [2] * 8
    assert api["plan"]["mode"] == mode and api["load"]["vision_parked"] == (mode == "swap")
    vision, language = api["worker"]["weights"]["vision"], api["worker"]["weights"]["language"]
    at_vision = api["phases"]["vision_encode"]["start_exact"]
    at_language = api["phases"]["slot_cache"]["start_exact"]
    assert (at_vision, at_language) == ((vision, language) if mode == "swap" else (vision + language,) * 2)
    worker = trace(small("cogvlm2", **kw))
    assert api["plan"] == worker["plan"]
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_exact_bytes"):
        assert api[key] == worker[key]
    assert {k: (p["calls"], p["peak_exact"]) for k, p in api["phases"].items()} == {
        k: (p["calls"], p["peak_exact"]) for k, p in worker["phases"].items()
    }


def test_a_trace_of_cogbatch_load_runs_the_planners_mode():
    with pytest.raises(ValueError, match="mode must be auto"):
        TraceConfig(api=True, mode="swap")


def test_the_worker_plans_under_what_the_card_has_left_after_its_context():
    """As on a card: `mem_get_info` leaves out the CUDA context, so a ceiling of the card's whole size is
    lowered to what the allocator can reach (`usable_ceiling`), and the plan stays under that."""
    GiB = 2**30
    r = trace(small("cogvlm", card_bytes=2 * GiB, context_bytes=GiB // 2))  # vram_ceiling: the card's 2 GiB
    assert r["plan"]["ceiling"] == 2 * GiB - GiB // 2 and r["planned_peak_bytes"] <= r["plan"]["ceiling"]
    assert r["oom_events"] == 0 and r["rows_ok"] == 2

"""The 8-bit KV cache on the GPU path: fake CUDA, small shapes, both generations, phase-swapped, sm86 bf16."""

import pytest

from cogbatch.dryrun import TraceConfig, trace
from cogbatch.dryrun.config import small_config


def _run(model, kv_cache):
    small = {"batch": 2, "images": 2, "tasks": 1, "new_tokens": 2}
    swap = {"capability": (8, 6), "dtype": "bf16", "quantization": "int4", "mode": "swap"}
    return trace(TraceConfig(model=model, config=small_config(model), kv_cache=kv_cache, **small, **swap))


@pytest.mark.parametrize("model", ["cogvlm2", "cogvlm"])
def test_an_int8_kv_cache_runs_and_its_slot_cache_is_about_half(model):
    sixteen, eight = _run(model, "none"), _run(model, "int8")
    assert eight["rows_ok"] == eight["rows"] == 2, eight["row_errors"]
    assert eight["tokens_out"] == [2, 2] and eight["oom_events"] == 0
    assert eight["quantization"] == "int4 kv-int8" and eight["plan"]["slots"] == sixteen["plan"]["slots"] == 2
    assert set(eight["sdpa_by_phase"]["decode"]) == {"efficient"}

    def cache_bytes(r):
        """Device bytes the slot cache phase added, less the decoder's token set (a bool per slot and vocab)."""
        p = r["phases"]["slot_cache"]
        return p["peak_exact"] - p["start_exact"] - r["plan"]["slots"] * small_config(model)["vocab_size"]

    hd = 128  # int8 values and one bf16 scale per head vector, against bf16 values
    assert cache_bytes(eight) / cache_bytes(sixteen) == pytest.approx((hd + 2) / (2 * hd), abs=2e-3)

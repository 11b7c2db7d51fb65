"""The memory model and the batch planner, on the real checkpoints' configs (no weights needed)."""

from __future__ import annotations

import pytest

from cogbatch.model.config import CogVLMConfig
from cogbatch.planner import DoesNotFit, GiB, MemoryModel, calibrate, plan_batches


def _mm(golden_dir, name, vision_gib, language_gib, cuda=True):
    cfg = CogVLMConfig.from_json(golden_dir / "real_configs" / name)
    return MemoryModel(cfg, 2, int(vision_gib * GiB), int(language_gib * GiB), materialized_attention=not cuda)


def test_kv_bytes_per_token_of_the_real_models(golden_dir):
    assert _mm(golden_dir, "cogvlm2-llama3-chat-19B", 0, 0).kv_per_token == 2 * 32 * 8 * 128 * 2  # GQA: 128 KiB
    assert _mm(golden_dir, "cogvlm-chat-hf", 0, 0).kv_per_token == 2 * 32 * 32 * 128 * 2  # 512 KiB
    assert _mm(golden_dir, "cogvlm2-llama3-chat-19B", 0, 0).prefix_tokens == 2307


def test_bigger_ceiling_bigger_batches(golden_dir):
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    small = plan_batches(mm, 16 * GiB, 32, 256)
    big = plan_batches(mm, 40 * GiB, 32, 256)
    assert 1 <= small.slots < big.slots
    assert small.peak_bytes <= 16 * GiB and big.peak_bytes <= 40 * GiB


def test_swap_mode_when_vision_and_language_do_not_fit_together(golden_dir):
    """CogVLM2 INT4 (~2.4 GiB vision + ~7.6 GiB language) under 11 GiB: the parts take turns."""
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    plan = plan_batches(mm, 11 * GiB, 32, 256)
    assert plan.mode == "swap"
    assert plan.slots >= 4
    assert plan.peak_bytes <= 11 * GiB
    # Swapping costs transfers: with room for the same batch either way, every weight stays resident.
    assert plan_batches(mm, 80 * GiB, 32, 256, cap=8).mode == "resident"


def test_too_small_a_ceiling_names_needed_and_available(golden_dir):
    mm = _mm(golden_dir, "cogvlm-chat-hf", 4.0, 5.0)
    with pytest.raises(DoesNotFit, match=r"needs about \d+\.\d+ GiB .* ceiling is 6.00 GiB"):
        plan_batches(mm, 6 * GiB, 32, 256)


def test_batch_cap_is_respected(golden_dir):
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    assert plan_batches(mm, 80 * GiB, 32, 256, cap=3).slots == 3


def test_calibration_only_grows_the_estimates(golden_dir):
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    plan = plan_batches(mm, 16 * GiB, 32, 256)
    calibrate(mm, plan.peak_bytes, plan.peak_bytes // 2)
    assert mm.correction == 1.0
    calibrate(mm, plan.peak_bytes, plan.peak_bytes + 2 * GiB)
    assert mm.correction > 1.0
    assert plan_batches(mm, 16 * GiB, 32, 256).slots < plan.slots


def test_plan_command_on_the_real_configs(tmp_path):
    """`cogbatch plan` from config.json alone: CogVLM2 INT4 with CPU embeddings runs batches of 4 in 11 GiB."""
    import json

    import yaml

    from tests.e2e.conftest import cogbatch_cmd
    from tests.golden import REPO

    (tmp_path / "images").mkdir()
    job = {
        "model": str(REPO / "tests" / "data" / "cogvlm2-llama3-chat-19B"),
        "device": "cuda",
        "dtype": "bf16",
        "input": {"folder": str(tmp_path / "images")},
        "output": str(tmp_path / "out"),
        "quantization": {"default": "int4", "embeddings_on_cpu": True},
        "tasks": [{"name": "caption", "prompt": "Describe this image in detail.", "max_new_tokens": 256}],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = cogbatch_cmd("plan", str(path), "--vram-ceiling", "11GiB", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["modes"]["resident"]["largest_batch"] <= 1
    assert report["plan"]["mode"] == "swap" and report["plan"]["slots"] >= 4
    assert 9 * GiB < report["weights"]["total"] < 11 * GiB
    human = cogbatch_cmd("plan", str(path), "--vram-ceiling", "11GiB")
    assert "swap: batch 1 needs" in human.stdout and "resident: batch 1 needs" in human.stdout

"""The memory model and the batch planner, on the real checkpoints' configs (no weights needed)."""

from __future__ import annotations

import pytest

from cogbatch.errors import DoesNotFit
from cogbatch.model.config import CogVLMConfig
from cogbatch.planning.batches import REASONABLE_BATCH, plan_batches, plan_mode
from cogbatch.planning.memory import GiB, MemoryModel, calibrate


def _mm(golden_dir, name, vision_gib, language_gib, cuda=True):
    cfg = CogVLMConfig.from_json(golden_dir / "real_configs" / name)
    return MemoryModel(cfg, 2, int(vision_gib * GiB), int(language_gib * GiB), materialized_attention=not cuda)


def test_kv_bytes_per_token_of_the_real_models(golden_dir):
    assert _mm(golden_dir, "cogvlm2-llama3-chat-19B", 0, 0).kv_per_token == 2 * 32 * 8 * 128 * 2  # GQA: 128 KiB
    assert _mm(golden_dir, "cogvlm-chat-hf", 0, 0).kv_per_token == 2 * 32 * 32 * 128 * 2  # 512 KiB
    assert _mm(golden_dir, "cogvlm2-llama3-chat-19B", 0, 0).prefix_tokens == 2307


def test_an_int8_kv_cache_halves_the_bytes_per_token_and_counts_its_dequantized_layer(golden_dir):
    """int8 keys and values plus one bf16 scale per head and token; attention reads one layer dequantized."""
    mm = _mm(golden_dir, "cogvlm-chat-hf", 2.2, 6.4)
    kv8 = _mm(golden_dir, "cogvlm-chat-hf", 2.2, 6.4)
    kv8.kv_dtype = "int8"
    assert kv8.kv_per_token == 2 * 32 * 32 * (128 + 2)  # 260 KiB against 512 KiB
    assert mm.kv_read(4, 1000) == 0
    assert kv8.kv_read(4, 1000) == 2 * 4 * 32 * 1000 * 128 * 2  # k and v of one layer, 4 rows, in bf16
    assert kv8.prefill_activations(4, 1, 1000) - mm.prefill_activations(4, 1, 1000) == kv8.kv_read(4, 1000)
    assert plan_batches(kv8, 11 * GiB, 128, 256).slots > plan_batches(mm, 11 * GiB, 128, 256).slots


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
    work = mm.decode_work(plan.slots, 32, 256)
    calibrate(mm, work, work // 2)
    assert mm.correction == 1.0
    calibrate(mm, work, work + 2 * GiB)
    assert mm.correction > 1.0
    assert plan_batches(mm, 16 * GiB, 32, 256).slots < plan.slots


def test_calibration_compares_what_the_phase_added_to_its_resident_weights(golden_dir):
    """Swap mode: the language phase starts with only the language weights resident; a phase that
    used twice its predicted working memory doubles the estimates, whatever the weights."""
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    work = mm.decode_work(4, 32, 256)
    calibrate(mm, work, 2 * work)
    assert mm.correction == 2.0


def test_every_weight_stays_resident_when_a_reasonable_batch_fits(golden_dir):
    """Resident needs no transfers per chunk: it wins over a larger swapped batch once it fits 4."""
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    cases = set()
    for quarters in range(44, 100):  # ceilings 11 .. 24.75 GiB
        ceiling = quarters * GiB // 4
        resident, swap = (plan_mode(mm, ceiling, 32, 256, 64, None, m) for m in ("resident", "swap"))
        plan = plan_batches(mm, ceiling, 32, 256)
        if resident and resident.slots >= REASONABLE_BATCH:
            assert plan.mode == "resident" and plan.slots == resident.slots
            cases.add("resident" if swap.slots > resident.slots else "resident, swap no better")
        else:
            assert plan.mode == "swap" and plan.slots == swap.slots > (resident.slots if resident else 0)
            cases.add("swap")
            if resident:
                assert f"only a batch of {resident.slots} fits" in " ".join(plan.notes)
    assert {"resident", "swap"} <= cases


def test_longer_prompts_get_fewer_slots(golden_dir):
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    short, long = plan_batches(mm, 24 * GiB, 32, 256), plan_batches(mm, 24 * GiB, 2048, 256)
    assert long.slots < short.slots and long.max_text == 2048


def test_a_chunk_carries_at_least_two_requests_per_slot(golden_dir):
    """With one task per image, a chunk of only `slots` images would leave freed slots nothing to take."""
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    for ceiling, cap in ((11, 64), (24, 64), (80, 64), (80, 3), (80, 1)):
        plan = plan_batches(mm, ceiling * GiB, 32, 256, cap=cap)
        assert plan.chunk_images >= 2 * plan.slots
        assert plan.encode_batch <= min(plan.chunk_images, cap)


def test_the_peak_counts_a_held_prefix_and_the_one_being_made(golden_dir):
    """Prefixes are made one image at a time; one more may be held for an image whose requests wait."""
    mm = _mm(golden_dir, "cogvlm2-llama3-chat-19B", 2.4, 7.6)
    plan = plan_batches(mm, 16 * GiB, 32, 256)
    assert plan.mode == "resident"
    P = mm.prefix_tokens
    floor = int(10.0 * GiB) + mm.kv(plan.slots * (P + 32 + 256)) + 2 * mm.kv(P) + mm.margin
    assert floor <= plan.peak_bytes <= 16 * GiB
    # One request per image: no prefix waits for another request, so one prefix less is counted
    mm.shared_prefixes = False
    assert mm.decode_peak(plan.slots, 32, 256, True) == plan.peak_bytes - mm.kv(P)


def test_only_several_requests_per_image_share_a_prefix():
    from types import SimpleNamespace as Task

    from cogbatch.planning.memory import shares_prefixes

    assert not shares_prefixes([Task(question_column=None)])  # one fixed prompt per image
    assert shares_prefixes([Task(question_column=None), Task(question_column=None)])  # two tasks
    assert shares_prefixes([Task(question_column="question")])  # manifest rows may repeat an image


def test_plan_command_on_the_real_configs(tmp_path):
    """`cogbatch plan` from config.json alone: CogVLM2 INT4 with CPU embeddings runs batches of 4 in 11 GiB."""
    import json

    import yaml

    from tests.e2e.conftest import cogbatch_cmd
    from tests.golden import golden_root

    (tmp_path / "images").mkdir()
    job = {
        "model": str(golden_root() / "real_configs" / "cogvlm2-llama3-chat-19B"),
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


def test_plan_for_a_gpu_from_a_machine_without_one(tmp_path, monkeypatch):
    """On a laptop or login node: `device: auto` plans for the CPU and says so; `--device cuda` plans for
    a GPU (bf16, as dtype auto picks on Ampere or newer) instead of failing on the missing CUDA."""
    import json

    import torch
    import yaml
    from click.testing import CliRunner

    from cogbatch.cli import cli
    from tests.golden import golden_root

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "images").mkdir()
    job = {
        "model": str(golden_root() / "real_configs" / "cogvlm2-llama3-chat-19B"),
        "input": {"folder": str(tmp_path / "images")},
        "output": str(tmp_path / "out"),
        "quantization": "int4",
        "tasks": [{"name": "caption", "prompt": "Describe this image in detail."}],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = CliRunner().invoke(cli, ["plan", str(path), "--json"])
    assert res.exit_code == 0, res.output
    cpu = json.loads(res.stdout)
    assert cpu["device"] == "cpu" and any("planned for the CPU" in n for n in cpu["notes"])
    res = CliRunner().invoke(cli, ["plan", str(path), "--device", "cuda", "--json"])
    assert res.exit_code == 0, res.output
    gpu = json.loads(res.stdout)
    assert (gpu["device"], gpu["dtype"]) == ("cuda", "bfloat16")
    assert any("no CUDA device here" in n for n in gpu["notes"])
    per_image = "vision_activation_bytes_per_image"  # SDPA's fused kernels on CUDA; materialised scores on CPU
    assert gpu["per_request"][per_image] < cpu["per_request"][per_image] / 4
    assert gpu["plan"]["mode"] == "swap" and gpu["plan"]["slots"] >= 3
    human = CliRunner().invoke(cli, ["plan", str(path), "--device", "cuda"])
    assert human.exit_code == 0 and "note: no CUDA device here" in human.stdout


def test_plan_counts_the_dense_copy_of_each_call_without_a_fused_int4_kernel(tmp_path, monkeypatch):
    """fp16 on CUDA (the 11 GiB pre-Ampere cards) dequantizes each int4 weight per call: CogVLM2's
    lm_head copy, 1 GiB in 16 bits, is in the language phase's peak; bf16 (TinyGemm) makes none."""
    import json

    import torch
    import yaml
    from click.testing import CliRunner

    from cogbatch.cli import cli
    from tests.golden import golden_root

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "images").mkdir()
    reports = {}
    for dtype in ("fp16", "bf16"):
        job = {
            "model": str(golden_root() / "real_configs" / "cogvlm2-llama3-chat-19B"),
            "device": "cuda",
            "dtype": dtype,
            "input": {"folder": str(tmp_path / "images")},
            "output": str(tmp_path / "out"),
            "quantization": "int4",
            "tasks": [{"name": "caption", "prompt": "Describe this image in detail.", "max_new_tokens": 256}],
        }
        path = tmp_path / f"{dtype}.yaml"
        path.write_text(yaml.safe_dump(job))
        res = CliRunner().invoke(cli, ["plan", str(path), "--json"])
        assert res.exit_code == 0, res.output
        reports[dtype] = json.loads(res.stdout)
    fp16, bf16 = reports["fp16"], reports["bf16"]
    assert fp16["dense_copy_bytes"]["language"] == 128256 * 4096 * 2  # lm_head, the largest layer
    assert bf16["dense_copy_bytes"] == {"vision": 0, "language": 0}
    assert fp16["plan"]["slots"] < bf16["plan"]["slots"]
    grown = fp16["modes"]["swap"]["peak_bytes_batch_1"] - bf16["modes"]["swap"]["peak_bytes_batch_1"]
    assert grown >= 128256 * 4096 * 2
    assert any("dense copy per call" in n for n in fp16["notes"])

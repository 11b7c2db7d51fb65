"""`cogbatch plan` before any download, for this machine or a named card, with and without embeddings_on_cpu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cogbatch
from cogbatch.errors import ConfigError
from cogbatch.planning.gpus import GiB

REPO = Path(__file__).resolve().parents[3]
PIPELINE = REPO / "pipeline.yaml"  # the aliases cogvlm, cogvlm2, ...
COGVLM2 = "THUDM/cogvlm2-llama3-chat-19B"


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Planning must never reach the hub, whatever the environment allows."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"plan tried to download: {args} {kwargs}")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)


def test_will_cogvlm2_fit_a_12gb_card_answered_before_any_download():
    report = cogbatch.plan_job(model="cogvlm2", gpu="RTX 3060 12GB", pipeline=PIPELINE)
    assert report.model == COGVLM2 and report.device == "cuda" and report.dtype == "bfloat16"
    assert report.config_source.startswith(f"{COGVLM2} is not downloaded: planned from the config.json cogbatch ships")
    assert report.target["name"] == "RTX 3060 12GB" and report.target["capability"] == "8.6"
    assert report.vram_ceiling == report.target["usable_bytes"] == int(11.5 * GiB)
    assert "TinyGemm" in report.int4_kernel and report.dense_copy_bytes == {"vision": 0, "language": 0}
    assert report.per_request["assumed_prompt_tokens"] == 128 and "no job file" in report.prompt_tokens_source
    without, with_cpu = report.variants
    assert (without["embeddings_on_cpu"], with_cpu["embeddings_on_cpu"]) == (False, True)
    assert without["plan"]["mode"] == "swap" and not without["modes"]["resident"]["fits"]
    # embeddings_on_cpu: auto (the default) puts the table in host memory for a run that must swap
    assert report.embeddings_auto and report.embeddings_on_cpu
    assert with_cpu["plan"] == {"mode": report.plan["mode"], "slots": report.plan["slots"], "error": None}
    embeddings = report.weights["embeddings"]
    assert without["weights_device_bytes"] - with_cpu["weights_device_bytes"] == embeddings > 0.9 * GiB
    assert with_cpu["modes"]["swap"]["largest_batch"] > without["modes"]["swap"]["largest_batch"]
    assert any("set vram_ceiling: 11776MiB to use this card" in n for n in report.notes)  # the job's 11 GiB
    text = report.describe()
    assert "card: RTX 3060 12GB, 12.00 GiB, compute capability 8.6; usable 11.50 GiB (minus 0.50 GiB" in text
    assert "what fits in 11.50 GiB" in text and "* int4-g128 + embeddings_on_cpu" in text
    assert "embeddings_on_cpu: auto -> the token embeddings in host memory" in text
    assert json.loads(json.dumps(report.to_dict()))["variants"][1]["embeddings_on_cpu"] is True


def test_a_card_before_sm80_plans_fp16_with_the_dense_copies():
    """A 2080 Ti: dtype auto is fp16 there, and no fused int4 kernel: each int4 layer expands per call."""
    old = cogbatch.plan_job(model="cogvlm2", gpu="2080 Ti", pipeline=PIPELINE)
    assert (old.dtype, old.target["capability"]) == ("float16", "7.5")
    assert old.dense_copy_bytes["language"] == 128256 * 4096 * 2  # lm_head in fp16
    assert "before sm80" in old.int4_kernel
    same_memory = cogbatch.plan_job(model="cogvlm2", vram="11GiB", capability="8.6", pipeline=PIPELINE)
    assert same_memory.dtype == "bfloat16" and same_memory.vram_ceiling == old.vram_ceiling
    on_device, on_host = old.variants
    assert on_device["plan"]["mode"] is None and "needs about" in on_device["plan"]["error"]  # the lm_head copy
    assert on_host["plan"]["mode"] == "swap"  # with embeddings_on_cpu it fits: what auto picks
    assert old.embeddings_on_cpu and old.plan["mode"] == "swap"
    assert same_memory.plan["mode"] == "swap" and same_memory.plan["slots"] >= 1
    grown = old.modes["swap"]["peak_bytes_batch_1"] - same_memory.modes["swap"]["peak_bytes_batch_1"]
    assert grown >= 128256 * 4096 * 2


def test_vram_and_capability_plan_as_the_named_card():
    named = cogbatch.plan_job(model="cogvlm", gpu="RTX 4090", pipeline=PIPELINE)
    sized = cogbatch.plan_job(model="cogvlm", vram=named.target["memory_bytes"], capability="8.9", pipeline=PIPELINE)
    assert named.plan == sized.plan and named.variants == sized.variants
    assert named.plan["mode"] == "resident"  # 23.5 GiB: CogVLM int4 stays resident with a real batch
    other_model = cogbatch.plan_job(REPO / "jobs" / "caption.yaml", model="cogvlm", gpu="RTX 4090")
    assert other_model.model == "THUDM/cogvlm-chat-hf" and "'caption'" in other_model.prompt_tokens_source
    unknown = cogbatch.plan_job(model="cogvlm", vram="24GiB", pipeline=PIPELINE)
    assert unknown.dtype == "bfloat16" and any("no --capability" in n for n in unknown.notes)


def test_an_int8_kv_cache_plans_more_slots_for_cogvlm_on_a_12gb_card(tmp_path):
    """CogVLM's 16-bit cache is 0.5 MiB per token (no grouped KV heads); kv_cache: int8 halves it."""
    import yaml

    reports = {}
    for kv in ("none", "int8"):
        job = tmp_path / f"{kv}.yaml"
        job.write_text(yaml.safe_dump({"model": "cogvlm", "input": {"folder": str(tmp_path)},
                                       "output": str(tmp_path / "out"), "vram_ceiling": "12GiB",
                                       "quantization": {"default": "int4", "kv_cache": kv},
                                       "tasks": [{"name": "c", "prompt": "Describe this image."}]}))  # fmt: skip
        reports[kv] = cogbatch.plan_job(job, gpu="RTX 3060 12GB", pipeline=PIPELINE)
    sixteen, eight = reports["none"], reports["int8"]
    assert eight.quantization == "int4-g128+kv8" and eight.weights == sixteen.weights
    assert eight.per_request["kv_cache_bytes"] < 0.52 * sixteen.per_request["kv_cache_bytes"]
    assert sixteen.plan["mode"] == "swap" and sixteen.plan["slots"] >= 3
    # with the smaller cache every weight can even stay resident with a reasonable batch
    assert eight.modes["swap"]["largest_batch"] > sixteen.modes["swap"]["largest_batch"]
    assert eight.modes["resident"]["largest_batch"] > sixteen.modes["resident"]["largest_batch"]
    assert eight.plan["slots"] >= 4


def test_a_job_whose_images_are_not_there_is_planned(monkeypatch, tmp_path):
    """jobs/caption.yaml on a fresh checkout: no images/ folder, no checkpoint, no network."""
    monkeypatch.chdir(tmp_path)  # its pipeline.yaml is found above the job file
    report = cogbatch.plan_job(REPO / "jobs" / "caption.yaml", device="cuda")
    assert report.model == COGVLM2 and report.config_source and report.target is None
    prompt = "Question: Describe this image in detail. Answer:"
    assert report.prompt_tokens_source == (
        f"the planner's default; the longest fixed prompt, 'caption', has at most {len(prompt) + 1} tokens"
    )
    assert report.plan["mode"] == "swap"


def test_the_hub_cache_copy_is_used_before_the_shipped_config(tmp_path):
    """A config.json already in the Hugging Face cache is the real one: planned from it, without a note."""
    import shutil

    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--THUDM--cogvlm2-llama3-chat-19B"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    shipped_config = REPO / "cogbatch" / "model" / "configs" / "cogvlm2-llama3-chat-19B" / "config.json"
    config = json.loads(shipped_config.read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 16}))
    try:
        cached = cogbatch.plan_job(model=COGVLM2, gpu="4090", pipeline=PIPELINE)
    finally:
        shutil.rmtree(repo)
    shipped = cogbatch.plan_job(model=COGVLM2, gpu="4090", pipeline=PIPELINE)
    assert cached.config_source is None and shipped.config_source is not None
    assert cached.weights["language"] < 0.6 * shipped.weights["language"]  # half the decoder layers


def test_a_sibling_of_a_shipped_checkpoint_is_planned_from_its_config_and_says_so():
    report = cogbatch.plan_job(model="cogvlm-grounding", gpu="A10G", pipeline=PIPELINE)
    assert report.model == "THUDM/cogvlm-grounding-generalist-hf"
    assert "(the architecture of THUDM/cogvlm-chat-hf, whose config it is)" in report.config_source


def test_a_model_with_no_config_anywhere_is_refused_without_a_download(tmp_path):
    with pytest.raises(ConfigError) as e:
        cogbatch.plan_job(model="someone/other-model", gpu="4090", pipeline=PIPELINE)
    assert "plan never downloads" in str(e.value) and "hf download someone/other-model config.json" in str(e.value)
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        cogbatch.plan_job(model=str(tmp_path / "missing"), pipeline=PIPELINE)


def test_a_tiny_model_is_planned_without_building_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("COGBATCH_CACHE_DIR", str(cache))
    report = cogbatch.plan_job(model="tiny-random:cogvlm2", device="cpu", pipeline=PIPELINE)
    assert report.generation == "cogvlm2" and report.plan["mode"] == "resident"
    assert not cache.exists()


def test_prompt_tokens_known_without_a_tokenizer(tmp_path):
    """A fixed prompt has at most its template's UTF-8 bytes + 1 tokens; a run plans for 128 at least."""
    from cogbatch.job import load_job
    from cogbatch.planning.report import prompt_tokens

    def job(*tasks):
        data = {"model": "tiny-random:cogvlm2", "input": {"folder": "."}, "output": str(tmp_path)}
        return load_job({**data, "tasks": list(tasks)}, pipeline=PIPELINE, inputs=False)

    long = "Describe every object in this photograph, " * 8
    tokens, how = prompt_tokens(job({"name": "short", "prompt": "Caption."}, {"name": "long", "prompt": long}))
    assert tokens == len(f"Question: {long} Answer:".encode()) + 1 > 128
    assert how == f"the longest fixed prompt, 'long', has at most {tokens} tokens"
    tokens, how = prompt_tokens(job({"name": "named", "prompt": "What is in {filename}?", "template": "vqa"}))
    assert tokens == 128 and "'named' not known before the run" in how


def test_cli_plans_for_a_card_and_refuses_mistakes_in_one_line():
    from click.testing import CliRunner

    from cogbatch.cli import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["plan", "--model", "cogvlm2", "--gpu", "rtx3060 12gb", "--pipeline", str(PIPELINE)])
    assert ok.exit_code == 0, ok.output
    assert "card: RTX 3060 12GB" in ok.stdout and "phase-swapped" in ok.stdout
    as_json = runner.invoke(cli, ["plan", "--model", "cogvlm2", "--vram", "12GiB", "--capability", "8.6", "--json",
                                  "--pipeline", str(PIPELINE)])  # fmt: skip
    assert as_json.exit_code == 0 and len(as_json.stdout.strip().splitlines()) == 1
    assert json.loads(as_json.stdout)["target"]["usable_bytes"] == int(11.5 * GiB)
    for args, message in (
        ([], "give a JOB file or --model NAME"),
        (["--model", "cogvlm2", "--gpu", "3080"], "matches RTX 3080 10GB, RTX 3080 12GB"),
        (["--model", "cogvlm2", "--gpu", "3060", "--device", "cpu"], "--device cpu: --gpu and --vram plan for a GPU"),
        (["--model", "cogvlm2", "--capability", "8.6"], "--capability needs --vram"),
    ):
        res = runner.invoke(cli, ["plan", *args, "--pipeline", str(PIPELINE)])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)


def test_verbose_plan_shows_what_the_peak_is_made_of_and_the_dry_runs_figures():
    """`cogbatch plan --verbose`: the planned peak's parts per phase add up to the plan's peak, and the
    fake-CUDA dry run's row nearest to the plan (same model, device class and mode) stands beside it."""
    report = cogbatch.plan_job(model="cogvlm2", gpu="RTX 3060 12GB", pipeline=PIPELINE)
    language, vision = report.basis["language"], report.basis["vision"]
    assert max(sum(language.values()), sum(vision.values())) == report.plan["peak_bytes"]
    assert language["waiting_prefix"] == 0  # one task: no image prefix waits for another request
    assert language["kv_cache"] == report.plan["slots"] * report.per_request["kv_cache_bytes"]
    d = report.dryrun
    assert (d["model"], d["device"], d["mode"]) == ("cogvlm2", "8.6-bf16", report.plan["mode"])
    assert d["slots"] <= report.plan["slots"] and "error" not in d
    text = report.describe(verbose=True)
    assert "basis, language phase (GiB): weights 7.17 + kv cache" in text and "basis, vision phase" in text
    assert f"nearest traced plan (fake CUDA at full size, 8.6-bf16, {d['mode']}, {d['slots']} slots" in text
    assert "basis," not in report.describe()
    tiny = cogbatch.plan_job(model="tiny-random:cogvlm2", gpu="RTX 3060 12GB", pipeline=PIPELINE)
    assert tiny.dryrun is None and "none traced for this model" in tiny.describe(verbose=True)

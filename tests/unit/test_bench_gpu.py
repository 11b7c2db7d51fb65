"""scripts/bench_gpu.py without a GPU: the pieces whose mistakes would waste a device lease.

The device call has one chance in a 15-minute allowance, so what can be checked on a CPU is checked
here: the checkpoint files it writes load as safetensors, the decode floor counts only what a text
decode step reads, the peak survives the worker's own resets, the time budget skips instead of
overrunning. The whole flow on tiny shapes (`--simulate`) is in tests/e2e/test_bench.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.scripts import import_script


@pytest.fixture(scope="module")
def bench_gpu():
    return import_script("bench_gpu")


def test_random_checkpoint_loads_through_the_model_loader(bench_gpu, tmp_path):
    from safetensors import safe_open

    from cogbatch.model.cogvlm import CogVLM

    config = bench_gpu.checkpoint_config("cogvlm1", simulate=True)
    info = bench_gpu.write_random_checkpoint(tmp_path / "ckpt", config, "cpu", seed=0)
    assert info["bytes"] == bench_gpu.checkpoint_bytes(config)
    model = CogVLM.from_pretrained(tmp_path / "ckpt", dtype="bfloat16", device="cpu", cache_dir=False)
    files = {}
    for f in (tmp_path / "ckpt").glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            files.update({name: h.get_tensor(name) for name in h.keys()})  # noqa: SIM118
    params = dict(model.named_parameters())
    assert set(params) <= set(files)
    assert all(torch.equal(p, files[name]) for name, p in params.items())
    assert torch.isfinite(model.lm_head.weight).all() and model.lm_head.weight.std() > 0
    # same seed, same weights: the benchmark's inputs are reproducible
    again = bench_gpu.write_random_checkpoint(tmp_path / "again", config, "cpu", seed=0)
    assert again["shards"] == info["shards"]
    first, second = (sorted((tmp_path / d).glob("*.safetensors")) for d in ("ckpt", "again"))
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in second]


def test_full_size_shapes_are_the_real_models(bench_gpu):
    """The checkpoints are the real configs' sizes: CogVLM2 ~19.5 B parameters, CogVLM ~17.6 B."""
    assert 19.4e9 < bench_gpu.checkpoint_bytes(bench_gpu.checkpoint_config("cogvlm2")) / 2 < 19.6e9
    assert 17.5e9 < bench_gpu.checkpoint_bytes(bench_gpu.checkpoint_config("cogvlm1")) / 2 < 17.8e9


def test_decode_floor_counts_what_a_text_decode_step_reads(bench_gpu):
    """weight_split's decode bytes = the parameters of the modules a one-token text step actually runs (+ LM head)."""
    from cogbatch.model.cogvlm import CogVLM
    from cogbatch.model.config import CogVLMConfig

    torch.manual_seed(0)
    model = CogVLM(CogVLMConfig.from_dict(bench_gpu.checkpoint_config("cogvlm2", simulate=True))).eval()
    ran: set[str] = set()
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: ran.add(names[m])) for m in model.modules()]
    ids = torch.tensor([[model.config.bos_token_id]])
    types = torch.zeros_like(ids)  # a text token: what every decode step feeds
    with torch.no_grad():
        hidden = model.model(model.model.embed_tokens(ids), types, torch.zeros_like(ids), torch.ones_like(ids))
        model.lm_head(hidden)
    for h in hooks:
        h.remove()
    read = sum(
        p.numel() * p.element_size()
        for name in ran - {"model.embed_tokens"}  # a lookup of one row, not a read of the table
        for p in model.get_submodule(name).parameters(recurse=False)
    )
    split = bench_gpu.weight_split(model)
    assert split["decode"] == read
    assert not any(".vision_expert_" in n or ".vision_mlp" in n for n in ran)
    # the vision experts are as big as the language experts: counting them would double the floor
    assert split["vision_experts"] > 0.9 * split["language_text"]
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert split["prefill"] == everything - split["embeddings"]


def test_peaks_survive_the_workers_resets(bench_gpu):
    """The worker resets CUDA's peak statistics per phase; the kept peak is still the whole block's."""
    state = {"reserved": 0, "allocated": 0, "resets": 0}

    def reset(device=None):
        state["resets"] += 1
        state["max_reserved"], state["max_allocated"] = state["reserved"], state["allocated"]

    cuda = SimpleNamespace(reset_peak_memory_stats=reset, max_memory_reserved=lambda: state["max_reserved"],
                           max_memory_allocated=lambda: state["max_allocated"])  # fmt: skip
    dev = bench_gpu.Device(SimpleNamespace(cuda=cuda), "cpu")
    dev.cuda = True  # a fake CUDA module: the folding logic is what is tested
    reset()
    with bench_gpu.PeakKeeper(dev) as peaks:
        state.update(max_reserved=9 * 2**30, max_allocated=8 * 2**30)  # the vision phase's peak...
        cuda.reset_peak_memory_stats()  # ...then the worker resets before the language phase
        state.update(max_reserved=5 * 2**30, max_allocated=4 * 2**30)
    assert peaks.gib("reserved") == 9.0 and peaks.gib("allocated") == 8.0
    assert cuda.reset_peak_memory_stats is reset  # restored afterwards


def test_budget_skips_what_would_overrun(bench_gpu, tmp_path, monkeypatch, capsys):
    """With no time left every part is skipped and says why; the JSON and the tables are still written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "gpu.json"
    rc = bench_gpu.main(["--simulate", "--budget-s", "0", "--workdir", str(tmp_path / "w"), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["models"][0]["skipped"].startswith("time budget")
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    assert "skipped (time budget" in capsys.readouterr().out


def test_budget_estimates_follow_measurements(bench_gpu):
    b = bench_gpu.Budget(100.0)
    guess = b.generate("int4", 4, 256, warm_up=False)
    b.measured_generate("int4", 1, prefill_s=0.5, step_s=0.02)
    assert b.generate("int4", 4, 256, warm_up=False) < guess
    assert b.generate("int4", 4, 256, warm_up=True) > b.generate("int4", 4, 256, warm_up=False)
    assert b.refuse(10.0) is None
    assert "needs ~" in b.refuse(1000.0)


def test_a_failing_part_is_recorded_not_raised(bench_gpu, capsys):
    assert bench_gpu.run_part("x", lambda: {"a": 1}) == {"a": 1}
    assert bench_gpu.run_part("x", lambda: 1 / 0) == {"error": "ZeroDivisionError('division by zero')"}
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_workdir_prefers_shared_memory_then_disk(bench_gpu, monkeypatch, tmp_path):
    free = {"/dev/shm": 100 * 2**30}
    monkeypatch.setattr(bench_gpu.shutil, "disk_usage", lambda p: SimpleNamespace(free=free.get(str(p), 0)))
    monkeypatch.setattr(bench_gpu.os, "access", lambda p, mode: True)
    monkeypatch.setattr(bench_gpu.Path, "is_dir", lambda p: True)
    monkeypatch.setattr(bench_gpu.Path, "mkdir", lambda p, **kw: None)
    monkeypatch.setattr(bench_gpu, "mem_available_bytes", lambda: 120 * 2**30)
    assert bench_gpu.pick_workdir(40 * 10**9, None) == Path("/dev/shm")
    monkeypatch.setattr(bench_gpu, "mem_available_bytes", lambda: 50 * 2**30)  # tmpfs would eat the host RAM
    with pytest.raises(OSError, match="pass --workdir"):
        bench_gpu.pick_workdir(40 * 10**9, None)
    free[bench_gpu.tempfile.gettempdir()] = 60 * 2**30
    assert bench_gpu.pick_workdir(40 * 10**9, None) == Path(bench_gpu.tempfile.gettempdir())
    assert bench_gpu.pick_workdir(40 * 10**9, tmp_path) == tmp_path

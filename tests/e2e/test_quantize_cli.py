"""`cogbatch quantize` fills the cache; a quantized `cogbatch run` then loads from it."""

from __future__ import annotations

import json

from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of


def test_quantize_ahead_then_run_from_the_cache(tmp_path, tiny_cogvlm1, job_factory):
    cache = tmp_path / "qcache"
    res = cogbatch_cmd(
        "quantize", str(tiny_cogvlm1), "--out", str(cache), "--quantization", "int8", "--rule", "lm_head=none",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["cache_hit"] is False and report["kernels"]
    assert list(cache.glob("quantized/*/quant.json"))

    make_images(tmp_path / "images", 2)
    job = job_factory(
        quantization={"default": "int8", "rules": [{"pattern": "lm_head", "dtype": "none"}]},
        dtype="bf16",
        cache_dir=str(cache),
    )
    env = {"COGBATCH_CACHE_DIR": ""}  # the job's cache_dir, not the test session's
    summary = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet", env=env))
    assert summary["exit_code"] == 0 and summary["done"] == 4
    assert summary["model_load"]["cache_hit"] is True
    assert summary["quant"] == "int8+rules"


def test_bad_rule_is_a_usage_error(tiny_cogvlm1):
    res = cogbatch_cmd("quantize", str(tiny_cogvlm1), "--rule", "lm_head")
    assert res.returncode == 2 and "PATTERN=DTYPE" in res.stderr
    res = cogbatch_cmd("quantize", str(tiny_cogvlm1), "--rule", "lm_head=int3")
    assert res.returncode == 2 and "int4, int8, none" in res.stderr


def test_mistakes_stop_before_quantizing(tmp_path, tiny_cogvlm1, monkeypatch):
    """A device that is not there, nothing to quantize, or a cache directory that cannot be written:
    exit 2 at once (these exited 1 after the load, or 0 with no cache entry written)."""
    import torch
    from click.testing import CliRunner

    from cogbatch.cli import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "afile").write_text("")
    cases = {
        ("--device", "cuda"): "--device cuda: torch sees no CUDA device here",
        ("--device", "tpu"): "--device: must be cpu, cuda or cuda:N",
        ("--quantization", "none"): "none has nothing to cache",
        ("--out", str(tmp_path / "afile" / "cache")): "cannot create it (Not a directory)",
    }
    for args, message in cases.items():
        out = () if "--out" in args else ("--out", str(tmp_path / "cache"))
        res = CliRunner().invoke(cli, ["quantize", str(tiny_cogvlm1), *args, *out])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("quantized/*"))


def test_quantize_verify_checks_an_existing_entry_and_rebuilds_a_damaged_one(tmp_path, tiny_cogvlm1):
    cache = tmp_path / "qcache"
    args = ("quantize", str(tiny_cogvlm1), "--out", str(cache), "--quantization", "int8", "--json")
    assert cogbatch_cmd(*args).returncode == 0
    (weights,) = cache.glob("quantized/*/model.safetensors")
    checked = json.loads(cogbatch_cmd(*args, "--verify").stdout)
    assert checked["cache_hit"] is True and checked["verify_s"] > 0
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: same size, same header
    weights.write_bytes(bytes(data))
    rebuilt = json.loads(cogbatch_cmd(*args, "--verify").stdout)
    assert rebuilt["cache_hit"] is False and "checksum mismatch" in rebuilt["cache_status"]

"""The benchmark scripts run and report what they print.

docs/benchmarks.md quotes the JSON that `scripts/bench.py` writes, so every table row it prints must be in
that JSON; `scripts/bench_gpu.py` cannot run without CUDA and must say so instead of failing
half-way. No test here asserts a timing: the machine is shared and timings are the output, not a
property of the code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import import_script

REPO = Path(__file__).resolve().parents[2]


def table_rows(text: str) -> list[list[str]]:
    """Markdown table body rows of the printed output (header and separator rows left out)."""
    rows, header_seen = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            header_seen = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header_seen:
            header_seen = True  # the first row of a table is its header
            continue
        if all(set(c) <= set("-:") for c in cells):
            continue
        rows.append(cells)
    return rows


@pytest.mark.slow
def test_bench_smoke_prints_the_rows_it_writes(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {t["sub"] for t in report["tables"]} == {"layers", "load", "pipeline", "loader"}
    in_json = [row for t in report["tables"] for row in t["rows"]]
    printed = table_rows(res.stdout)
    assert printed, res.stdout
    assert printed == in_json
    for t in report["tables"]:
        assert t["rows"] and all(len(r) == len(t["columns"]) for r in t["rows"])
    # --render re-prints the same tables from the JSON (what docs/benchmarks.md quotes)
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--render", str(out)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert table_rows(again.stdout) == in_json


def test_bench_gpu_without_cuda_exits_with_a_clear_message(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--json", str(tmp_path / "gpu.json")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert res.returncode == 2
    assert "needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_bench_gpu_arguments():
    bench_gpu = import_script("bench_gpu")
    args = bench_gpu.parse_args(["--models", "cogvlm2", "--batches", "1,4", "--quants", "int4"])
    assert (args.models, args.batches, args.quants) == (["cogvlm2"], [1, 4], ["int4"])
    # the figures by default: CogVLM2 (CogVLM-17B opt-in), 256 new tokens, the Worker at batch 4 under 11 GiB
    d = bench_gpu.parse_args([])
    assert (d.models, d.new_tokens, d.worker_batch, d.ceiling_gib) == (["cogvlm2"], 256, 4, 11.0)
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--models", "llava"])
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--batches", "1,x"])


@pytest.mark.slow
def test_bench_gpu_simulate_runs_every_part_and_survives_a_failing_one(tmp_path, monkeypatch, capsys):
    """The device call's whole flow on tiny shapes on the CPU; one part fails and the others still run."""
    bench_gpu = import_script("bench_gpu")
    real = bench_gpu.bench_generate

    def flaky(model, dev, batch, *args, **kwargs):
        if batch == 2:
            raise RuntimeError("injected")
        return real(model, dev, batch, *args, **kwargs)

    monkeypatch.setattr(bench_gpu, "bench_generate", flaky)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out" / "gpu.json"
    argv = ["--simulate", "--batches", "1,2", "--new-tokens", "2", "--worker-batch", "2", "--workdir",
            str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    assert bench_gpu.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    (model,) = report["models"]
    assert [q["quant"] for q in model["quants"]] == ["int4", "bf16"]
    for q in model["quants"]:
        ok, failed = q["rows"]
        assert failed == {"batch": 2, "error": "RuntimeError('injected')"}
        assert ok["batch"] == 1 and ok["decode_tok_s"] > 0 and ok["images_per_s"] > 0
        split = q["load"]["split_bytes"]
        assert 0 < split["decode"] < split["prefill"]  # the decode step reads less than the prefill
        assert ok["decode_floor_ms"] > 0 and ok["prefill_floor_s"] > 0
        assert split["decode"] == split["language_text"] + split["lm_head"]
        w = q["worker"]
        assert w["ok_rows"] == 2 and w["generated_tokens"] == 2 * 2 and w["mode"] in ("resident", "swap")
    assert model["quants"][0]["load"]["kernels"]  # int4 reports its kernel classes
    assert not any((tmp_path / "work").iterdir())  # the checkpoint is deleted afterwards
    # every table row printed is in the JSON, the failure included, and --render prints the same
    in_json = [row for t in report["tables"] for row in t["rows"]]
    assert table_rows(printed) == in_json
    assert any("error: RuntimeError('injected')" in cell for row in in_json for cell in row)
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--render", str(out)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert table_rows(again.stdout) == in_json

"""The benchmark scripts run and report what they print.

The README quotes the JSON that `scripts/bench.py` writes, so every table row it prints must be in
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
    # --render re-prints the same tables from the JSON (what the README quotes)
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
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_gpu
    finally:
        sys.path.pop(0)
    args = bench_gpu.parse_args(["--models", "cogvlm2", "--batches", "1,4", "--quants", "int4"])
    assert (args.models, args.batches, args.quants) == (["cogvlm2"], [1, 4], ["int4"])
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--models", "llava"])
    # the random checkpoints get the real models' sizes
    kw = bench_gpu.shape_kwargs("cogvlm2")
    assert (kw["hidden_size"], kw["layers"], kw["kv_heads"], kw["image_size"]) == (4096, 32, 8, 1344)
    assert bench_gpu.shape_kwargs("cogvlm1")["vision_layers"] == 63

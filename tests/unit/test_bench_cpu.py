"""scripts/bench.py's arithmetic: where the pipeline overhead and the loader comparison get their figures.

The figures themselves are timings (never asserted); what is checked is which measurement each
table row is built from: the run's own model compute time when its summary has one, measured GPU
rates when a GPU benchmark JSON is committed.
"""

from __future__ import annotations

import json

import pytest

from tests.scripts import import_script


@pytest.fixture(scope="module")
def bench():
    return import_script("bench")


def test_in_run_compute_is_found_wherever_the_summary_puts_it(bench):
    assert bench.in_run_compute_s({"done": 3, "model_compute_s": 12.5}) == 12.5
    assert bench.in_run_compute_s({"stats": {"worker": {"model_compute_s": 2}}}) == 2.0
    assert bench.in_run_compute_s({"done": 3, "wall_s": 9.0}) is None
    assert bench.in_run_compute_s({"model_compute_s": None}) is None


def test_pipeline_split_uses_the_runs_own_compute_time(bench):
    summary = {"wall_s": 20.0, "done": 64, "model_compute_s": 15.0, "model_load": {"total_s": 2.0}}
    child = {"load_s": 100.0, "compute_s": 100.0}  # a second process's figures must not be used then
    r = bench.pipeline_split(22.0, summary, child)
    assert r["source"].startswith("in the run")
    assert (r["start_load"], r["compute"]) == (4.0, 15.0)  # 2 s before the run's clock + the 2 s load
    assert r["rest"] == pytest.approx(3.0) and r["overhead"] == pytest.approx(3.0 / 22.0)
    assert r["after_load"] == pytest.approx(3.0 / 18.0)


def test_pipeline_split_counts_the_whole_worker_construction_as_load(bench):
    """`model_load_s` (imports, weights, tokenizer, plan) is the load when the run reports it; the load
    report's total alone leaves library imports in the overhead."""
    summary = {"wall_s": 20.0, "done": 64, "model_compute_s": 12.0, "model_load_s": 5.0, "plan_s": 1.5,
               "model_load": {"total_s": 2.0}}  # fmt: skip
    r = bench.pipeline_split(22.0, summary, None)
    assert (r["start_load"], r["compute"], r["plan"]) == (7.0, 12.0, 1.5)
    assert r["rest"] == pytest.approx(3.0)


def test_pipeline_split_falls_back_to_the_second_process(bench):
    summary = {"wall_s": 20.0, "done": 64, "model_load": {"total_s": 2.0}}
    r = bench.pipeline_split(22.0, summary, {"load_s": 3.0, "compute_s": 14.0})
    assert r["source"] == "second process"
    assert (r["start_load"], r["compute"], r["rest"]) == (5.0, 14.0, 3.0)


def _gpu_report(simulate: bool = False) -> dict:
    return {
        "device": "NVIDIA H100 80GB HBM3",
        "new_tokens": 256,
        "simulate": simulate,
        "models": [
            {
                "model": "cogvlm2",
                "quants": [
                    {
                        "quant": "int4",
                        "rows": [{"batch": 1, "images_per_s": 0.2}, {"batch": 4, "images_per_s": 0.5},
                                 {"batch": 8, "error": "RuntimeError('x')"}],
                        "worker": {"images": 4, "mode": "swap", "images_per_s": 0.4},
                    },
                    {"quant": "bf16", "load": {"skipped": "time budget"}, "rows": [], "worker": None},
                ],
            }
        ],
    }  # fmt: skip


def test_loader_is_compared_with_measured_gpu_rates_when_a_gpu_json_exists(bench, tmp_path):
    (tmp_path / "gpu-2026-12-01.json").write_text(json.dumps(_gpu_report()))
    t = bench.consumption_table(4.0, tmp_path)
    assert "measured" in t["title"] and "gpu-2026-12-01.json" in t["title"] and "H100" in t["title"]
    assert t["rows"] == [
        ["cogvlm2 int4, pipeline path (swap), 4 images", "0.40", "0.10"],
        ["cogvlm2 int4, generate batch 4", "0.50", "0.12"],
    ]


def test_loader_falls_back_to_stated_assumptions(bench, tmp_path):
    (tmp_path / "gpu-2026-12-02.json").write_text(json.dumps(_gpu_report(simulate=True)))  # a CPU dry run
    t = bench.consumption_table(4.0, tmp_path)
    assert "assumptions" in t["title"]
    assert [r[0] for r in t["rows"]] == list(bench.GPU_SECONDS_PER_IMAGE)

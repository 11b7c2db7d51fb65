"""`cogbatch.results`: what commands return, as one line of JSON and as text for humans."""

from __future__ import annotations

import json

from cogbatch.results import RunSummary, WorkerCounters, WorkerStats

SUMMARY = RunSummary(
    "r1", "out", "m", "int4-g128", done=4, failed=1, skipped=0, wall_s=2.0, images_per_s=1.5, tokens_per_s=10.0,
    peak_host_rss_bytes=2**30, worker=WorkerStats(execution_mode="resident", planned_batch=8),
    model_load={"checkpoint": "/ckpt", "device": "cuda:0", "dtype": "bfloat16", "quantization": "int4-g128",
                "total_s": 12.34, "total_weight_bytes": 9 * 2**30, "weight_bytes": {"4-bit": 1},
                "plan": {"mode": "resident", "slots": 8}},
)  # fmt: skip


def test_the_human_summary_says_the_model_in_one_line_and_device_memory_on_cuda():
    from dataclasses import replace

    text = replace(SUMMARY, peak_device_bytes=10 * 2**30).describe()
    lines = text.splitlines()
    assert len(lines) == 3 and "{" not in text  # never a dict dump
    assert lines[1] == "peak host memory 1.00 GiB, peak device memory 10.00 GiB"
    assert lines[2] == ("model: /ckpt on cuda:0 (bfloat16, int4-g128), loaded in 12.3 s, weights 9.00 GiB; "
                        "resident mode, planned batch 8")  # fmt: skip
    assert "device memory" not in SUMMARY.describe()  # CPU runs have no device peak


def test_a_ray_run_says_its_actors_and_the_clusters_start_up_cost():
    from dataclasses import replace

    ray = replace(SUMMARY, engine="ray", workers=2, ray_startup_s=4.83)
    assert ray.describe().splitlines()[-1] == "ray: 2 actor(s), start-up 4.8 s"
    joined = replace(ray, ray_startup_s=None)  # a notebook's own ray.init(): no start-up of ours
    assert joined.describe().splitlines()[-1] == "ray: 2 actor(s), joined a cluster"
    assert "ray" not in SUMMARY.describe()


def test_the_summary_dict_is_flat_and_leaves_out_what_was_not_set():
    d = SUMMARY.to_dict()
    assert d["execution_mode"] == "resident" and d["planned_batch"] == 8 and "worker" not in d
    assert "interrupted" not in d and "message" not in d and "engine" not in d and "peak_device_bytes" not in d
    json.dumps(d)  # plain data
    stopped = RunSummary("r2", "out", "m", "none", message="interrupted", interrupted=True, exit_code=143)
    assert stopped.to_dict()["interrupted"] is True
    assert stopped.describe() == "interrupted; run the same command again."


def test_worker_stats_recompute_their_ratios_from_the_counters():
    counters = WorkerCounters(requests=7, batches=3, decode_rows=30, decode_steps=8, prefill_padding=5,
                              prefill_tokens=40, model_compute_s=1.23456, generated_tokens=21)  # fmt: skip
    stats = WorkerStats.of(counters, ["resident", "resident", "swap"], [8, 4, 8])
    assert (stats.mean_batch_size, stats.padding_fraction, stats.model_compute_s) == (3.75, 0.125, 1.235)
    assert (stats.execution_mode, stats.planned_batch) == ("resident", 8)
    counters.add({"requests": 1, "model_compute_s": 0.5})
    assert counters.requests == 8 and counters.model_compute_s == 1.73456

"""`cogbatch compare` on the golden tiny checkpoints (random weights: the figures mean little, their order does).

The job's quantization (b) against the compute dtype (a): none against none is identical (agreement 1,
KL exactly 0), int4 moves the answers (agreement < 1, KL > 0) and int8 lands between.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import cogbatch
from tests.e2e.conftest import cogbatch_cmd, make_images

TASKS = [
    {"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 6},
    {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa", "max_new_tokens": 4},
]


@pytest.fixture
def golden_job(tmp_path, golden_dir):
    """A job mapping on the golden CogVLM checkpoint over 3 images; keyword arguments override its keys."""
    make_images(tmp_path / "images", 3)

    def job(**keys):
        return {
            "model": str(golden_dir / "cogvlm1" / "dev"),
            "input": {"folder": str(tmp_path / "images")},
            "output": str(tmp_path / "out"),
            "device": "cpu",
            "dtype": "fp32",
            "tasks": TASKS,
            **keys,
        }

    return job


def test_none_against_none_agrees_exactly(tmp_path, golden_job):
    report = cogbatch.compare_job(golden_job(quantization="none"), sample=2)
    o = report.overall
    assert (o["pairs"], o["scored"], o["exact_match"], o["prefix_agreement"]) == (4, 4, 1.0, 1.0)
    assert o["tf_top1"] == 1.0 and o["tf_kl"] == 0.0 and o["tf_positions"] > 0
    assert o["chrf"] == 100.0 and o["rouge_l"] == 1.0 and o["mean_first_divergence"] is None
    assert (report.images, report.input_images) == (2, 3)
    table = pq.read_table(report.pairs_file).to_pylist()
    assert len(table) == 4 and len({(r["image_id"], r["task"]) for r in table}) == 4  # one row per (image, task)
    assert {r["task"] for r in table} == {"caption", "colors"} and all(r["text_a"] == r["text_b"] for r in table)
    assert report.pairs_file.startswith(str(tmp_path / "out.cogbatch"))
    assert not (tmp_path / "out").exists()  # the output is not touched


def test_int4_moves_the_answers_and_int8_lands_between(golden_job):
    int4 = cogbatch.compare_job(golden_job(quantization="int4"), sample=2).overall
    int8 = cogbatch.compare_job(golden_job(quantization="int8"), sample=2).overall
    assert int4["tf_kl"] > 0 and int4["tf_top1"] < 1 and int4["prefix_agreement"] < 1
    assert 0 < int8["tf_kl"] < int4["tf_kl"]
    assert int4["tf_top1"] <= int8["tf_top1"] and int4["prefix_agreement"] <= int8["prefix_agreement"]


def test_the_same_seed_samples_the_same_images(golden_job):
    first = cogbatch.compare_job(golden_job(quantization="none"), sample=1, seed=3)
    again = cogbatch.compare_job(golden_job(quantization="none"), sample=1, seed=3)
    paths = [{r["path"] for r in pq.read_table(rep.pairs_file).to_pylist()} for rep in (first, again)]
    assert paths[0] == paths[1] and len(paths[0]) == 1


def test_per_layer_names_the_group_that_moves_the_kl_most(golden_job):
    report = cogbatch.compare_job(golden_job(quantization="int4"), sample=1, per_layer=True)
    groups = report.per_layer
    assert [g.group for g in groups] != [] and len(groups) == 4
    kls = [g.tf_kl for g in groups]
    assert all(kl is not None and kl > 0 for kl in kls) and kls == sorted(kls, reverse=True)
    assert [r["pattern"] for r in report.advice] == groups[0].patterns
    assert {r["dtype"] for r in report.advice} == {"int8"}  # one step above the job's int4
    assert "per layer group" in report.describe()


def test_cli_prints_one_json_line_and_refuses_mistakes_in_one_line(tmp_path, golden_job):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(golden_job(quantization="none")))
    res = cogbatch_cmd("compare", str(job), "--sample", "1", "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.strip().splitlines()
    data = json.loads(line)
    assert data["overall"]["exact_match"] == 1.0 and data["a"]["quantization"] == "none"
    for args, message in (
        (["--against", "int3"], "--against"),
        (["--pairs", str(tmp_path / "out" / "pairs.parquet")], "inside the output"),
        (["--per-layer"], "quantizes nothing"),
    ):
        res = cogbatch_cmd("compare", str(job), *args)
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1

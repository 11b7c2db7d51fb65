"""The summary of pairs, the report's table and JSON, and where the pairs file goes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cogbatch.compare.report import Answer, CompareReport, GroupKL, Pair, SideStats, default_pairs_path, summarize
from cogbatch.compare.scores import ForcedScore


def _pair(task, a_tokens, b_tokens, a_text, b_text, forced=None, error=None):
    return Pair("img.png", "id-" + a_text, task, "Describe.", Answer(a_text, a_tokens, "eos"),
                Answer(b_text, b_tokens, "eos", error), forced)  # fmt: skip


def _pairs():
    return [
        _pair("caption", [1, 2, 3], [1, 2, 3], "a cat", "a cat", ForcedScore(3, 0.0, 3)),
        _pair("caption", [1, 2, 3, 4], [1, 9, 3, 4], "a dog", "a cow", ForcedScore(4, 0.4, 2)),
        _pair("caption", [1], [1], "x", "x", error="out of memory"),
    ]


def test_summarize_by_hand():
    s = summarize(_pairs())
    assert (s["pairs"], s["scored"], s["errors"]) == (3, 2, 1)
    assert s["exact_match"] == 0.5
    assert s["prefix_agreement"] == pytest.approx((1.0 + 0.25) / 2)
    assert (s["diverged"], s["mean_first_divergence"]) == (1, 1.0)
    # teacher-forced: weighted by token, 7 positions, 5 agree, 0.4 nats in all
    assert (s["tf_positions"], s["tf_top1"]) == (7, pytest.approx(5 / 7))
    assert s["tf_kl"] == pytest.approx(0.4 / 7)
    assert s["rouge_l"] == pytest.approx((1.0 + 0.5) / 2)


def test_an_error_pair_has_no_scores():
    row = _pairs()[2].row()
    assert row["error"] == "out of memory" and row["exact"] is None and row["tf_kl"] is None


def test_pairs_go_beside_the_output_never_in_it(tmp_path):
    when = dt.datetime(2026, 3, 1, 12, 30, 5, tzinfo=dt.timezone.utc)
    path = default_pairs_path(tmp_path / "out", when)
    assert path == tmp_path / "out.cogbatch" / "compare-20260301T123005Z.parquet"


def test_report_json_is_one_line_and_the_table_reads(tmp_path):
    from cogbatch.compare.report import write_pairs

    pairs = _pairs()
    file = tmp_path / "p.parquet"
    write_pairs(file, pairs, {"a": "none", "b": "int4-g128"})
    table = pq.read_table(file)
    assert table.num_rows == 3 and table.schema.metadata[b"cogbatch.b"] == b"int4-g128"
    assert table.column("tokens_b").to_pylist()[1] == [1, 9, 3, 4]
    a = SideStats("a", "none", "cpu", "bfloat16", "resident", images=2, generate_s=4.0)
    b = SideStats("b", "int4-g128", "cuda", "bfloat16", "swap", images=2, generate_s=1.0)
    report = CompareReport(
        job="job.yaml", model="m", a=a, b=b, seed=0, requested_images=2, images=2, input_images=9, topk=256,
        overall=summarize(pairs), tasks={"caption": summarize(pairs)}, pairs_file=str(file), kept_mass=0.9,
        per_layer=[GroupKL("lm_head", ["lm_head"], 1, 7, 0.01, 0.9), GroupKL("vision tower", ["model.vision.*"], 0,
                   skipped="the job does not quantize it")],
        advice=[{"pattern": "lm_head", "dtype": "int8"}],
    )  # fmt: skip
    line = json.dumps(report.to_dict())
    assert "\n" not in line and json.loads(line)["b"]["images_per_s"] == 2.0
    text = report.describe()
    assert "caption" in text and "all" in text and "0.50" in text  # exact match of the two scored pairs
    assert '{pattern: "lm_head", dtype: int8}' in text and "a lower bound" in text
    assert "0.50 images/s" in text and "2.00 images/s" in text
    assert Path(report.pairs_file).name in text

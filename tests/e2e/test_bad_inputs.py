"""Bad images and bad rows become error rows with reasons; the run goes on and exits 0."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from cogbatch.store import read_results
from tests.corpus import make_bad_image_corpus
from tests.e2e.conftest import cogbatch_cmd, summary_of


def test_bad_input_corpus_gives_rows_for_everything(tmp_path, job_factory):
    corpus = tmp_path / "corpus"
    expected = make_bad_image_corpus(corpus)
    names = sorted(expected)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": [f"corpus/{n}" for n in names] + [None]}), manifest)
    job = job_factory(input={"manifest": str(manifest)},  # {filename}: filled for the null-path row too
                      tasks=[{"name": "caption", "prompt": "Describe {filename}.", "max_new_tokens": 2}])  # fmt: skip

    res = cogbatch_cmd("run", str(job), "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    summary = summary_of(res)
    rows = {r["path"]: r for r in read_results(tmp_path / "out").to_pylist()}
    for name, reason in expected.items():
        row = rows[f"corpus/{name}"]
        if reason is None:
            assert row["status"] == "ok", (name, row["error"])
            assert row["width"] and row["height"]
        else:
            assert row["status"] == "error", name
            assert reason in row["error"], (name, row["error"])
    null_row = rows["manifest.parquet#" + str(len(names))]
    assert null_row["status"] == "error" and "null path" in null_row["error"]
    assert null_row["prompt"] == f"Describe manifest.parquet#{len(names)}."
    assert summary["failed"] == sum(r is not None for r in expected.values()) + 1

    # exit code 3 only when asked for
    again = cogbatch_cmd("run", str(job), "--fail-on-error", "--output", str(tmp_path / "o2"), "--quiet")
    assert again.returncode == 3

"""Every Parquet reader opens a real output directory as it is and gets exactly its result rows.

The output has been written by two runs (the second incremental, with a byte-identical copy whose row is
reused), has had its gallery built, a history, a hash cache and a cron log: all of that lives in the state
directory beside it, so that pandas, pyarrow, polars and DuckDB, pointed at the directory or at the globs
docs/output.md gives, read result rows and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cogbatch.store import RESULT_SCHEMA, read_results
from cogbatch.store.state import CRON_LOG, state_dir, state_file
from tests.e2e.conftest import cogbatch_cmd, make_images

KEY = ["path", "task", "run_id", "text"]


@pytest.fixture(scope="module")
def output(tmp_path_factory, tiny_cogvlm1) -> Path:
    root = tmp_path_factory.mktemp("readers")
    images = make_images(root / "images", 3)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({
        "model": str(tiny_cogvlm1), "input": {"folder": str(root / "images")}, "output": str(root / "out"),
        "quantization": "none", "device": "cpu", "dtype": "fp32", "batch_size": 8, "flush_rows": 4,
        "tasks": [{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 3},
                  {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa", "max_new_tokens": 2}],
    }))  # fmt: skip
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    make_images(root / "images", 2, seed=3, start=3)  # the next night: new images, and a copy of one
    (root / "images" / "copy.png").write_bytes(images[0].read_bytes())
    res = cogbatch_cmd("run", str(job), "--quiet", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["reused"] == 1 and json.loads(res.stdout)["skipped"] == 6  # incremental
    assert cogbatch_cmd("gallery", str(job), "--quiet").returncode == 0
    state_file(root / "out", CRON_LOG).write_text('{"done": 6}\n')  # what a scheduled night leaves
    out = root / "out"
    assert {p.name for p in state_dir(out).iterdir()} >= {"gallery", "hashes.parquet", "runs.jsonl", CRON_LOG}
    return out


def _expected(out: Path) -> Counter:
    rows = read_results(out).to_pylist()
    assert len(rows) == 12  # 6 items x 2 tasks, exactly once each
    return Counter(tuple(r[c] for c in KEY) for r in rows)


def _rows(records: list[dict]) -> Counter:
    return Counter(tuple(r[c] for c in KEY) for r in records)


def test_the_output_directory_holds_result_parts_only(output):
    assert {p.name.startswith("part-") and p.suffix == ".parquet" and p.is_file() for p in output.iterdir()} == {True}


def test_pandas_read_parquet_of_the_directory(output):
    import pandas as pd

    df = pd.read_parquet(output)
    assert list(df.columns) == RESULT_SCHEMA.names
    assert _rows(df.to_dict("records")) == _expected(output)


def test_pyarrow_parquet_read_table_of_the_directory(output):
    import pyarrow.parquet as pq

    table = pq.read_table(output)
    assert table.schema.names == RESULT_SCHEMA.names
    assert _rows(table.to_pylist()) == _expected(output)


def test_pyarrow_dataset_of_the_directory(output):
    import pyarrow.dataset as ds

    dataset = ds.dataset(output, format="parquet")
    assert dataset.schema.names == RESULT_SCHEMA.names and dataset.count_rows() == 12
    assert _rows(dataset.to_table().to_pylist()) == _expected(output)


@pytest.mark.parametrize("where", ["{out}", "{out}/*.parquet", "{out}/**/*.parquet"])
def test_polars_scan_parquet_of_the_directory_and_its_globs(output, where):
    import polars as pl

    frame = pl.scan_parquet(where.format(out=output)).collect()
    assert frame.columns == RESULT_SCHEMA.names and frame.height == 12
    assert _rows(frame.to_dicts()) == _expected(output)


@pytest.mark.parametrize("glob", ["**/*.parquet", "*.parquet"])
def test_duckdb_read_parquet_of_the_globs(output, glob):
    import duckdb

    con = duckdb.connect()
    source = f"read_parquet('{output}/{glob}')"
    assert con.sql(f"SELECT count(*) FROM {source}").fetchall() == [(12,)]
    star = con.sql(f"SELECT * FROM {source}")
    assert star.columns == RESULT_SCHEMA.names
    records = [dict(zip(star.columns, r, strict=True)) for r in star.fetchall()]
    assert _rows(records) == _expected(output)


def test_the_snippets_of_docs_output_md_run_as_written(output):
    """The reading snippets of the docs, run against this output: each prints the number of result rows."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "output.md").read_text()
    snippets = [block.split("```", 1)[0] for block in doc.split("```python\n")[1:]]
    assert len(snippets) >= 4
    for code in snippets:
        code = code.replace("outputs/caption", str(output))
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, code + res.stderr
        assert "12" in res.stdout, code + res.stdout

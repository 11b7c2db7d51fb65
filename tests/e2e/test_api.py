"""The notebook API: `cogbatch.run_job(path_or_config, **overrides)` returns the run summary (a RunSummary)."""

from __future__ import annotations

import pytest

import cogbatch
from cogbatch.job import load_job
from cogbatch.store import read_results
from tests.e2e.conftest import make_images


def test_run_job_in_process(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    summary = cogbatch.run_job(job_factory(), batch_size=2, quiet=True)
    assert summary.exit_code == 0 and summary.done == 6
    assert read_results(tmp_path / "out").num_rows == 6
    assert cogbatch.run_job(job_factory(), quiet=True).model_loaded is False


def test_overrides_apply_to_a_loaded_config_too(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    cfg = load_job(job_factory())
    summary = cogbatch.run_job(cfg, output=str(tmp_path / "o2"), limit=1, quiet=True)
    assert summary.done == 2 and summary.output == str(tmp_path / "o2")  # one image, both tasks
    assert read_results(tmp_path / "o2").num_rows == 2
    assert not (tmp_path / "out").exists()


def test_a_misspelt_override_is_an_error_not_ignored(tmp_path, job_factory):
    make_images(tmp_path / "images", 1)
    job = job_factory()
    with pytest.raises(TypeError, match="unknown override"):
        cogbatch.run_job(load_job(job), outptu=str(tmp_path / "o2"))
    with pytest.raises(TypeError, match="unknown override"):
        cogbatch.run_job(job, limt=1)
    with pytest.raises(TypeError, match="engine must be"):
        cogbatch.run_job(job, engine="spark")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()

"""The notebook API: `cogbatch.run_job(path, **overrides)` returns the run summary."""

from __future__ import annotations

import cogbatch
from cogbatch.store import read_results
from tests.e2e.conftest import make_images


def test_run_job_in_process(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    summary = cogbatch.run_job(job_factory(), batch_size=2, quiet=True)
    assert summary["exit_code"] == 0 and summary["done"] == 6
    assert read_results(tmp_path / "out").num_rows == 6
    assert cogbatch.run_job(job_factory(), quiet=True)["model_loaded"] is False

"""`cogbatch run` end to end on a tiny checkpoint: rows, resume, incremental runs, settings changes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import cogbatch
from cogbatch.cli import cli
from cogbatch.errors import ConfigError
from cogbatch.history import read_history
from cogbatch.inputs.hashes import HashCache
from cogbatch.model.weights import CheckpointError
from cogbatch.store import RESULT_SCHEMA, read_results
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of


@pytest.mark.slow
def test_forty_images_then_nothing_then_only_the_new_and_edited(tmp_path, job_factory):
    images = make_images(tmp_path / "images", 40)
    job = job_factory()

    first = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert first["exit_code"] == 0 and first["done"] == 80 and first["failed"] == 0
    table = read_results(tmp_path / "out")
    assert table.schema.equals(RESULT_SCHEMA)
    assert table.num_rows == 80
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert len(set(zip(table.column("image_id").to_pylist(), table.column("task").to_pylist(), strict=True))) == 80
    for part in (tmp_path / "out").glob("part-*.parquet"):
        assert pq.read_schema(part).equals(RESULT_SCHEMA)
    prompts = {r["path"]: r["prompt"] for r in table.to_pylist() if r["task"] == "colors"}
    assert prompts[str(images[3])] == f"What colors are in {images[3].stem}?"  # placeholder filled per image
    assert (tmp_path / "out" / "config.resolved.yaml").is_file()

    again = cogbatch_cmd("run", str(job), "--json", "--quiet")
    second = summary_of(again)
    assert second["pending"] == 0 and second["model_loaded"] is False
    assert "nothing to do" in second["message"] and again.stderr == ""  # --quiet: no human summary

    make_images(tmp_path / "images", 5, seed=1, start=40)
    images[7].write_bytes(images[8].read_bytes()[:-1] + b"\0")  # edited: new bytes, new id
    images[9].rename(images[9].with_name("renamed.png"))  # renamed: same bytes, not redone
    third = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert third["pending"] == 12
    assert third["done"] + third["failed"] == 12
    assert read_results(tmp_path / "out").num_rows == 92


@pytest.mark.slow
def test_changed_settings_are_refused_then_redone_on_request(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    job = job_factory()
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0

    changed = job_factory(tasks=[{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 6},
                                 {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa",
                                  "max_new_tokens": 3}])  # fmt: skip
    res = cogbatch_cmd("run", str(changed), "--quiet")
    assert res.returncode == 2
    assert "'caption'" in res.stderr and "max_new_tokens: 4 -> 6" in res.stderr
    assert "--redo-changed" in res.stderr and "Traceback" not in res.stderr

    redo = summary_of(cogbatch_cmd("run", str(changed), "--redo-changed", "--json", "--quiet"))
    assert redo["pending"] == 3 and redo["done"] == 3
    status = summary_of(cogbatch_cmd("status", str(changed), "--json"))
    assert status["tasks"]["caption"] == {"ok": 3, "error": 0, "stale": 0, "pending": 0}
    assert status["tasks"]["colors"]["ok"] == 3


def test_overrides_limit_and_output(tmp_path, job_factory):
    make_images(tmp_path / "images", 6)
    other = tmp_path / "elsewhere"
    make_images(other, 2, seed=9)
    job = job_factory()
    res = summary_of(cogbatch_cmd("run", str(job), "--input", str(other), "--output", str(tmp_path / "o2"),
                                  "--limit", "1", "--batch-size", "1", "--json", "--quiet"))  # fmt: skip
    assert res["pending"] == 2 and res["done"] == 2  # one image, both tasks
    assert read_results(tmp_path / "o2").num_rows == 2
    assert not (tmp_path / "out").exists()


def test_compact_keeps_every_row(tmp_path, job_factory):
    make_images(tmp_path / "images", 10)
    job = job_factory(flush_rows=3)
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    before = read_results(tmp_path / "out").sort_by([("image_id", "ascending"), ("task", "ascending")])
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) > 2
    summary = summary_of(cogbatch_cmd("compact", str(tmp_path / "out"), "--json"))
    assert summary["parts_after"] == 1
    after = read_results(tmp_path / "out").sort_by([("image_id", "ascending"), ("task", "ascending")])
    assert after.equals(before)


def test_demo_runs_without_gpu_or_download(tmp_path):
    res = cogbatch_cmd("demo", "--output", str(tmp_path / "demo"), "--images", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert (res.stdout + res.stderr).count("text is random") == 1  # said once, on stderr
    summary = summary_of(res)
    assert summary["done"] == 6
    # Where the time went, for the pipeline benchmark: scan + plan, model load, model compute, all within the run.
    assert min(summary["plan_s"], summary["model_load_s"], summary["model_compute_s"]) > 0
    assert summary["plan_s"] + summary["model_load_s"] + summary["model_compute_s"] < summary["wall_s"]


def _manifest_with_a_missing_file(tmp_path) -> Path:
    images = make_images(tmp_path / "images", 2)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": [f"images/{p.name}" for p in images] + ["images/gone.png"]}), manifest)
    return manifest


def test_a_ceiling_too_small_for_the_weights_stops_before_work(tmp_path, job_factory):
    job = job_factory(input={"manifest": str(_manifest_with_a_missing_file(tmp_path))})
    res = cogbatch_cmd("run", str(job), "--vram-ceiling", "1MiB", "--quiet")
    assert res.returncode == 2
    assert "needs about" in res.stderr and "ceiling is 0.00 GiB" in res.stderr and "Traceback" not in res.stderr
    assert read_results(tmp_path / "out").num_rows == 0  # not even the missing file's error rows
    (record,) = read_history(tmp_path / "out")
    assert record["exit_code"] == 2 and record["run_id"]  # the aborted run is named in the history


def test_a_wrong_model_writes_no_row_so_the_right_one_can_run_next(tmp_path, job_factory, tiny_cogvlm1):
    manifest = _manifest_with_a_missing_file(tmp_path)
    wrong = job_factory("wrong.yaml", model=str(tmp_path / "no-model"), input={"manifest": str(manifest)})
    (tmp_path / "no-config").mkdir()
    no_config = job_factory("empty.yaml", model=str(tmp_path / "no-config"), input={"manifest": str(manifest)})
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        cogbatch.run_job(wrong, quiet=True)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        cogbatch.run_job(no_config, quiet=True)
    only_missing = tmp_path / "only_missing.parquet"
    pq.write_table(pa.table({"path": ["images/gone.png"]}), only_missing)
    with pytest.raises(CheckpointError):  # no model would load, but the error rows would name the wrong one
        cogbatch.run_job(wrong, input=str(only_missing), quiet=True)
    assert read_results(tmp_path / "out").num_rows == 0

    right = cogbatch.run_job(job_factory(input={"manifest": str(manifest)}), quiet=True)
    assert right.exit_code == 0 and right.done == 4 and right.failed == 2


def test_error_rows_stay_until_retried_then_the_retry_is_the_current_row(tmp_path, job_factory):
    """Image `b` has no question in the manifest: an error row, which counts as done (same image, same task).
    Once the question is filled in, a plain re-run does nothing; `--retry-errors` redoes just that pair."""
    images = make_images(tmp_path / "images", 2)
    manifest = tmp_path / "manifest.parquet"
    paths = [str(p) for p in images]
    pq.write_table(pa.table({"path": paths, "q": ["What is shown?", None]}), manifest)
    task = {"name": "ask", "question_column": "q", "template": "vqa", "max_new_tokens": 3}
    job = job_factory(input={"manifest": str(manifest)}, tasks=[task])
    first = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert (first["done"], first["failed"]) == (1, 1)
    pq.write_table(pa.table({"path": paths, "q": ["What is shown?", "Which colors?"]}), manifest)
    again = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))
    assert (again["pending"], again["skipped"], again["model_loaded"]) == (0, 2, False)
    retry = summary_of(cogbatch_cmd("run", str(job), "--retry-errors", "--json", "--quiet"))
    assert (retry["pending"], retry["skipped"], retry["done"], retry["failed"]) == (1, 1, 1, 0)
    status = json.loads(cogbatch_cmd("status", str(job), "--json").stdout)
    assert (status["tasks"]["ask"]["ok"], status["tasks"]["ask"]["error"]) == (2, 0)
    assert summary_of(cogbatch_cmd("run", str(job), "--retry-errors", "--json", "--quiet"))["pending"] == 0


def test_quiet_json_prints_one_json_line_and_nothing_else(tmp_path, job_factory):
    make_images(tmp_path / "images", 2)
    res = cogbatch_cmd("run", str(job_factory()), "--quiet", "--json")
    assert res.returncode == 0
    assert len(res.stdout.splitlines()) == 1 and json.loads(res.stdout)["done"] == 4
    assert res.stderr == ""  # no progress, no human summary: a cron log stays one JSON line per run


def test_status_of_an_output_that_does_not_exist_yet_creates_nothing(tmp_path, job_factory):
    make_images(tmp_path / "images", 2)
    res = CliRunner().invoke(cli, ["status", str(job_factory()), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tasks"]["caption"]["pending"] == 2
    assert not (tmp_path / "out").exists()


def test_a_signal_while_hashing_the_input_stops_with_nothing_done(tmp_path, job_factory, monkeypatch):
    make_images(tmp_path / "images", 4)
    job = job_factory()
    real = HashCache.image_id

    def hash_then_terminate(self, path):
        os.kill(os.getpid(), signal.SIGTERM)  # as if `kill PID` came while a big folder is being hashed
        return real(self, path)

    monkeypatch.setattr(HashCache, "image_id", hash_then_terminate)
    summary = cogbatch.run_job(job, quiet=True)
    assert summary.exit_code == 143 and summary.interrupted and summary.done == 0
    assert "nothing was done" in summary.message
    assert read_results(tmp_path / "out").num_rows == 0
    assert len(HashCache(tmp_path / "out").entries) == 1  # hashed before the signal: kept
    monkeypatch.setattr(HashCache, "image_id", real)
    assert cogbatch.run_job(job, quiet=True).done == 8


def test_a_signal_before_the_run_starts_exits_143(tmp_path, job_factory, monkeypatch):
    import cogbatch.api

    make_images(tmp_path / "images", 1)

    def terminated_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the command")

    monkeypatch.setattr(cogbatch.api, "load_job", terminated_while_loading)
    res = CliRunner().invoke(cli, ["run", str(job_factory()), "--quiet"])
    assert res.exit_code == 143 and "interrupted" in res.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the caller's handler is back


def test_a_second_ctrl_c_stops_at_once_with_130_and_the_output_resumes(tmp_path, job_factory, monkeypatch):
    from cogbatch.engines.progress import Progress
    from cogbatch.worker.worker import ModelWorker

    make_images(tmp_path / "images", 9)
    job = job_factory(batch_size=1)  # one decode slot: chunks of a few images, so several chunks
    real_process, real_done = ModelWorker.process, Progress.request_done
    chunks = []

    def counting_process(self, *args, **kwargs):
        chunks.append(1)
        return real_process(self, *args, **kwargs)

    def ctrl_c_twice_in_the_second_chunk(self, *args, **kwargs):
        real_done(self, *args, **kwargs)
        if len(chunks) >= 2:  # the first chunk's rows are with the writer
            os.kill(os.getpid(), signal.SIGINT)  # finish the batch in flight...
            os.kill(os.getpid(), signal.SIGINT)  # ...no: stop at once

    monkeypatch.setattr(ModelWorker, "process", counting_process)
    monkeypatch.setattr(Progress, "request_done", ctrl_c_twice_in_the_second_chunk)
    res = CliRunner().invoke(cli, ["run", str(job), "--quiet"])
    assert res.exit_code == 130 and "stopped at once" in res.stderr and "Aborted" not in res.output
    kept = read_results(tmp_path / "out").num_rows
    assert 0 < kept < 18  # the first chunk's rows were flushed, the rest not done
    assert read_history(tmp_path / "out")[-1]["exit_code"] == 130

    monkeypatch.setattr(Progress, "request_done", real_done)
    assert cogbatch.run_job(job, quiet=True).done == 18 - kept
    rows = read_results(tmp_path / "out").to_pylist()
    assert len({(r["image_id"], r["task"]) for r in rows}) == len(rows) == 18


def test_jobs_demo_yaml_runs_on_its_own_from_the_repository(tmp_path):
    root = Path(__file__).resolve().parents[2]
    res = cogbatch_cmd("run", "jobs/demo.yaml", "--output", str(tmp_path / "demo"), "--json", cwd=root)
    assert res.returncode == 0, res.stderr
    assert summary_of(res)["done"] == 16
    assert res.stderr.count("text is random") == 1  # said for every tiny-random run (not with --quiet)


def test_demo_job_and_jobs_demo_yaml_ask_the_same(tmp_path, monkeypatch):
    from cogbatch.demo import demo_job
    from cogbatch.job import load_job

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    yaml_job = load_job("jobs/demo.yaml", {"output": str(tmp_path / "out")}, pipeline=None)
    assert demo_job(tmp_path / "demo", 1).tasks == yaml_job.tasks


def test_an_input_without_images_says_so_rather_than_already_done(tmp_path, job_factory):
    (tmp_path / "images").mkdir()
    make_images(tmp_path / "images", 1)
    summary = cogbatch.run_job(job_factory(input={"folder": str(tmp_path / "images"), "extensions": ["jpeg"]}),
                               quiet=True)  # fmt: skip
    assert summary.exit_code == 0 and not summary.model_loaded
    assert summary.message == f"nothing to do: no images in or under {tmp_path / 'images'} (extensions: .jpeg)"
    manifest = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), manifest)
    summary = cogbatch.run_job(job_factory(input={"manifest": str(manifest)}), quiet=True)
    assert summary.message == f"nothing to do: the manifest {manifest} has no rows"

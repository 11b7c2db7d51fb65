"""`cogbatch.history`: runs.jsonl appends (concurrent, torn lines) and the records of runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from click.testing import CliRunner

from cogbatch.cli import cli
from cogbatch.history import (
    HISTORY_NAME,
    append_record,
    format_table,
    new_part_counts,
    part_names,
    read_history,
    run_record,
)
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.results import RunSummary
from cogbatch.store import PartWriter, make_row


def _cfg(output):
    return SimpleNamespace(output=output, model="m", quantization=QuantConfig(default="none"), path=None)


def test_append_and_read_back(tmp_path):
    assert read_history(tmp_path) == []
    append_record(tmp_path, {"run_id": "a", "exit_code": 0})
    append_record(tmp_path, {"run_id": "b", "exit_code": 130})
    assert [r["run_id"] for r in read_history(tmp_path)] == ["a", "b"]
    assert (tmp_path / HISTORY_NAME).read_text().count("\n") == 2


def test_a_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path):
    append_record(tmp_path, {"run_id": "a"})
    with open(tmp_path / HISTORY_NAME, "ab") as f:
        f.write(b'{"run_id": "torn", "exit')  # a writer cut off mid-line
    assert [r["run_id"] for r in read_history(tmp_path)] == ["a"]
    append_record(tmp_path, {"run_id": "c"})
    assert [r["run_id"] for r in read_history(tmp_path)] == ["a", "c"]


def test_bad_lines_are_skipped_with_a_warning_naming_the_file_and_line(tmp_path):
    append_record(tmp_path, {"run_id": "a"})
    with open(tmp_path / HISTORY_NAME, "ab") as f:
        f.write(b"junk\n[1, 2]\n\n\xff\xfe\n")  # not JSON, not an object, blank (fine), not UTF-8
    append_record(tmp_path, {"run_id": "b"})
    warnings: list[str] = []
    assert [r["run_id"] for r in read_history(tmp_path, warn=warnings.append)] == ["a", "b"]
    why = "not a run record (cut off by a crash, or edited); skipped"
    assert warnings == [f"{tmp_path / HISTORY_NAME} line {n}: {why}" for n in (2, 3, 5)]
    (tmp_path / "dir" / HISTORY_NAME).mkdir(parents=True)
    assert read_history(tmp_path / "dir", warn=warnings.append) == []
    assert warnings[-1] == f"cannot read {tmp_path / 'dir' / HISTORY_NAME}: Is a directory"


def test_status_history_warns_about_bad_lines_and_shows_the_good_ones(tmp_path):
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(
        json.dumps(
            {
                "model": "tiny-random:cogvlm2",
                "input": {"folder": str(tmp_path)},
                "output": str(out),
                "tasks": [{"name": "caption", "prompt": "Describe."}],
            }
        )
    )
    out.mkdir()
    (out / HISTORY_NAME).write_text('{"run_id": "torn", "exit\n')
    res = CliRunner().invoke(cli, ["status", str(job), "--history"])
    assert res.exit_code == 0
    assert f"warning: {out / HISTORY_NAME} line 1: not a run record" in res.output
    assert f"{out}: no readable runs" in res.output and "no runs recorded yet" not in res.output
    append_record(out, {"run_id": "good-run", "exit_code": 0})
    res = CliRunner().invoke(cli, ["status", str(job), "--history"])
    assert res.exit_code == 0 and "good-run" in res.output and "line 1: not a run record" in res.output


def test_concurrent_appenders_never_interleave(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from cogbatch.history import append_record
        for i in range(50):
            append_record({str(tmp_path)!r}, {{"run_id": f"{{sys.argv[1]}}-{{i}}", "pad": "x" * 3000}})
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)]) for n in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = (tmp_path / HISTORY_NAME).read_text().splitlines()
    assert len(lines) == 200
    records = [json.loads(line) for line in lines]  # every line is one whole record
    assert {r["run_id"] for r in records} == {f"{n}-{i}" for n in range(4) for i in range(50)}


def test_record_of_a_finished_run(tmp_path):
    summary = RunSummary("r1", str(tmp_path), "m", "none", images=3, skipped=2, pending=5, done=4, failed=1)
    rec = run_record(_cfg(tmp_path), 1_700_000_000.0, summary, None)
    assert rec["run_id"] == "r1" and rec["exit_code"] == 0 and rec["outcome"] == "ok"
    assert rec["done"] == 4 and rec["failed"] == 1 and rec["skipped"] == 2
    assert rec["started"] == "2023-11-14T22:13:20Z" and rec["ended"] >= rec["started"]
    assert set(rec["versions"]) == {"cogbatch", "torch", "transformers", "optimum-quanto"}
    assert rec["model"] == "m" and rec["quant"] == "none"


def test_record_of_an_aborted_run_counts_its_parts(tmp_path):
    before = part_names(tmp_path)
    with PartWriter(tmp_path, "run-x") as w:
        for i, status in enumerate(["ok", "ok", "error"]):
            w.add(make_row(image_id=f"{i}", task="t", status=status, fingerprint="f", run_id="run-x"))
    counts = new_part_counts(tmp_path, before)
    assert counts == {"run-x": {"ok": 2, "error": 1}}
    rec = run_record(_cfg(tmp_path), 0.0, None, RuntimeError("disk on fire"), counts)
    assert rec["exit_code"] == 1 and rec["outcome"] == "aborted"
    assert rec["run_id"] == "run-x" and rec["done"] == 2 and rec["failed"] == 1
    assert "disk on fire" in rec["message"]
    rec = run_record(_cfg(tmp_path), 0.0, None, KeyboardInterrupt(), {})
    assert rec["exit_code"] == 130 and rec["outcome"] == "interrupted"
    assert rec["run_id"] is None and "Ctrl-C" in rec["message"]


def test_a_second_signal_is_recorded_with_the_exit_code_the_cli_exits_with(tmp_path):
    import signal

    from cogbatch.errors import Interrupted

    assert run_record(_cfg(tmp_path), 0.0, None, Interrupted(signal.SIGTERM), {})["exit_code"] == 143
    assert run_record(_cfg(tmp_path), 0.0, None, Interrupted(signal.SIGINT), {})["exit_code"] == 130


def test_user_errors_are_recorded_as_exit_2_like_the_cli(tmp_path):
    from cogbatch.errors import CheckpointError, ConfigError, DoesNotFit, EngineError, SettingsChanged

    for error in (SettingsChanged("x"), DoesNotFit("x"), EngineError("x"), CheckpointError("x"), ConfigError("x")):
        assert run_record(_cfg(tmp_path), 0.0, None, error, {})["exit_code"] == 2, error
    assert run_record(_cfg(tmp_path), 0.0, None, ValueError("a bug"), {})["exit_code"] == 1


def test_an_aborted_run_is_recorded_with_its_run_id_and_the_absolute_job_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = RuntimeError("boom")
    error.cogbatch_run_id = "20250101T000000Z-abcdef"  # what the runner attaches before re-raising
    cfg = _cfg(tmp_path)
    cfg.path = Path("jobs/caption.yaml")
    rec = run_record(cfg, 0.0, None, error, {})
    assert rec["run_id"] == "20250101T000000Z-abcdef"
    assert rec["job"] == str(tmp_path / "jobs" / "caption.yaml")


def test_table(tmp_path):
    text = format_table([{"run_id": "r1", "started": "s", "wall_s": 12.4, "exit_code": 0, "outcome": "ok", "done": 3}])
    header, row = text.splitlines()
    assert header.split()[:5] == ["run_id", "started", "wall", "exit", "outcome"]
    assert row.split()[:6] == ["r1", "s", "12s", "0", "ok", "3"]

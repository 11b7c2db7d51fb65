"""Nightly runs end to end: the printed cron command run by hand, the run lock across processes, history.

The crontab is never touched here: these tests print the line and run its command with `bash -c`,
as cron would. A fake pass-through `flock` stands in where util-linux is missing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogbatch.store import read_results
from cogbatch.store.state import HISTORY, RUN_LOCK_INFO, state_file
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of


@pytest.fixture
def flock_path(tmp_path) -> dict:
    """Environment for the commands: the real flock, or a pass-through fake first on PATH."""
    if shutil.which("flock"):
        return {}
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    fake = fake_bin / "flock"
    fake.write_text('#!/bin/sh\nshift 4\nexec "$@"\n')  # flock -n -E 75 LOCKFILE CMD...
    fake.chmod(0o755)
    return {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}


def _run_cron_command(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    # cron starts in $HOME with a minimal PATH; the command must not depend on either
    full_env = {**os.environ, **env, "PATH": env.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd / "home")}
    return subprocess.run(["bash", "-c", command], cwd=cwd / "home", env=full_env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def _no_duplicates(out: Path) -> int:
    table = read_results(out)
    keys = list(zip(table["path"].to_pylist(), table["task"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)), "a (path, task) pair was done twice"
    return len(keys)


@pytest.mark.slow
def test_printed_command_run_by_hand_does_only_new_images(tmp_path, job_factory, flock_path):
    (tmp_path / "home").mkdir()
    make_images(tmp_path / "images", 3)
    job = job_factory(tasks=[{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 3}])
    res = cogbatch_cmd("schedule", str(job), "--cron", "0 2 * * *", "--json", cwd=tmp_path, env=flock_path)
    assert res.returncode == 0, res.stderr
    entry = json.loads(res.stdout)
    assert entry["line"].startswith("0 2 * * * ") and entry["line"].endswith(f"job={job.resolve()}")
    out = tmp_path / "out"
    assert entry["log"] == str(tmp_path / "out.cogbatch" / "cogbatch.log")  # beside the output, not in it

    first = _run_cron_command(entry["command"], tmp_path, flock_path)
    assert first.returncode == 0, first.stderr + Path(entry["log"]).read_text()
    assert _no_duplicates(out) == 3
    log_text = Path(entry["log"]).read_text()
    assert '"done": 3' in log_text  # the --json summary went to the log

    make_images(tmp_path / "images", 2, seed=5, start=3)
    second = _run_cron_command(entry["command"], tmp_path, flock_path)
    assert second.returncode == 0
    assert _no_duplicates(out) == 5
    history = [json.loads(line) for line in state_file(out, HISTORY).read_text().splitlines()]
    assert [(h["pending"], h["done"], h["exit_code"]) for h in history] == [(3, 3, 0), (2, 2, 0)]
    assert {p.name.startswith("part-") for p in out.iterdir()} == {True}  # the log and the locks are not in it

    status = cogbatch_cmd("status", str(job), "--history")
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0].split()[:4] == ["run_id", "started", "wall", "exit"] and len(lines) == 3
    assert summary_of(cogbatch_cmd("status", str(job), "--history", "--json"))[1]["done"] == 2

    if not flock_path:  # the real flock: a night that finds the last one still going exits 75 at once
        with open(entry["lock"], "a") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            t0 = time.monotonic()
            busy = _run_cron_command(entry["command"], tmp_path, flock_path)
            assert busy.returncode == 75 and time.monotonic() - t0 < 5
        assert len(state_file(out, HISTORY).read_text().splitlines()) == 2
        note = json.loads(Path(entry["log"]).read_text().splitlines()[-1])  # the refused night is in the log
        assert note["event"] == "skipped" and note["exit_code"] == 75


@pytest.mark.slow
def test_two_concurrent_runs_one_works_the_other_exits_75(tmp_path, job_factory):
    make_images(tmp_path / "images", 24)
    job = job_factory(batch_size=1, tasks=[{"name": "caption", "prompt": "Describe this image.",
                                            "max_new_tokens": 16}])  # fmt: skip
    out = tmp_path / "out"
    exe = shutil.which("cogbatch")
    cmd = [exe] if exe else [sys.executable, "-m", "cogbatch"]
    first = subprocess.Popen([*cmd, "run", str(job), "--json", "--quiet"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not state_file(out, RUN_LOCK_INFO).exists():  # the first run holds the lock
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        second = cogbatch_cmd("run", str(job), "--json", "--quiet")
        elapsed = time.monotonic() - t0
        assert second.returncode == 75, second.stderr
        assert first.poll() is None, "the first run ended before the second was refused: make it slower"
        assert elapsed < 10
        assert f"pid {first.pid}" in second.stderr and "cogbatch run" in second.stderr
        assert "Traceback" not in second.stderr and second.stdout == ""
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["done"] == 24
    assert _no_duplicates(out) == 24
    history = [json.loads(line) for line in state_file(out, HISTORY).read_text().splitlines()]
    assert [h["exit_code"] for h in history] == [0]  # the refused run did no work and left no record
    assert not state_file(out, RUN_LOCK_INFO).exists()


def test_run_refused_while_the_lock_is_held_and_a_stale_lock_is_taken_over(tmp_path, job_factory):
    from cogbatch.lock import job_lock

    make_images(tmp_path / "images", 1)
    job = job_factory(tasks=[{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 2}])
    out = tmp_path / "out"
    with job_lock(out, command="cogbatch run nightly.yaml"):
        res = cogbatch_cmd("run", str(job), "--quiet")
    assert res.returncode == 75
    assert f"pid {os.getpid()}" in res.stderr and "nightly.yaml" in res.stderr and "Traceback" not in res.stderr

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"pid": dead.pid, "host": os.uname().nodename, "started": "2020-01-01T02:00:00Z", "command": "x"}
    state_file(out, RUN_LOCK_INFO).write_text(json.dumps(stale))
    res = cogbatch_cmd("run", str(job))  # not --quiet: that is errors only, and this is a warning
    assert res.returncode == 0, res.stderr
    assert "did not finish cleanly" in res.stderr and f"pid {dead.pid}" in res.stderr
    assert read_results(out).num_rows == 1

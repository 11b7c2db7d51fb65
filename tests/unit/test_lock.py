"""`cogbatch.lock`: one run per output dataset; a second one fails at once naming the holder."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from cogbatch.lock import JobLocked, current_holder, describe_holder, job_lock, pid_alive
from cogbatch.store.state import RUN_LOCK_INFO, state_dir, state_file


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_acquirer_in_the_same_process_fails_with_the_holders_info(tmp_path):
    out = tmp_path / "out"
    with job_lock(out, command="cogbatch run jobs/a.yaml") as info:
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        sidecar = json.loads(state_file(out, RUN_LOCK_INFO).read_text())
        assert sidecar == info
        assert current_holder(out) == info
        with pytest.raises(JobLocked) as err, job_lock(out):
            pass
        assert err.value.exit_code == 75
        assert err.value.holder == info
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert info["started"] in message and "cogbatch run jobs/a.yaml" in message
    assert not state_file(out, RUN_LOCK_INFO).exists()  # released: sidecar removed
    assert current_holder(out) is None
    with job_lock(out):  # and free again
        pass


def test_second_process_fails_fast_while_a_live_holder_runs(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from cogbatch.lock import job_lock
                with job_lock({str(out)!r}, command="holder process"):
                    print("locked", flush=True)
                    sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(JobLocked) as err, job_lock(out):
            pass
        assert time.monotonic() - t0 < 2.0  # fails at once, never waits for the holder
        assert err.value.holder["pid"] == holder.pid
        assert f"pid {holder.pid}" in str(err.value) and "holder process" in str(err.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with job_lock(out):  # the holder ended: the lock is free
        pass


def test_lock_of_a_killed_process_is_free_at_once(tmp_path):
    """The kernel drops a flock with its process: kill -9 never leaves the output locked."""
    out = tmp_path / "out"
    code = f"from cogbatch.lock import job_lock\nimport os, signal\nwith job_lock({str(out)!r}):\n"
    code += "    os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert state_file(out, RUN_LOCK_INFO).exists()  # the dead run's sidecar is still there
    with job_lock(out) as info:
        assert info["pid"] == os.getpid()


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    state_dir(out).mkdir(parents=True)
    dead = _dead_pid()
    assert not pid_alive(dead)
    stale = {"pid": dead, "host": socket.gethostname(), "started": "2020-01-01T02:00:00Z", "command": "cogbatch run x"}
    state_file(out, RUN_LOCK_INFO).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="cogbatch"), job_lock(out) as info:
        assert info["pid"] == os.getpid()
        assert json.loads(state_file(out, RUN_LOCK_INFO).read_text())["pid"] == os.getpid()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "did not finish cleanly" in warning and f"pid {dead}" in warning and "no longer running" in warning


def test_damaged_sidecar_does_not_block(tmp_path):
    out = tmp_path / "out"
    state_dir(out).mkdir(parents=True)
    state_file(out, RUN_LOCK_INFO).write_text("{not json")
    with job_lock(out) as info:
        assert info["pid"] == os.getpid()


def test_describe_holder_without_info():
    assert "unknown" in describe_holder({})
    assert describe_holder({"pid": 7, "host": "h", "started": "t", "command": "c"}) == "pid 7 on host h, started t: c"


def test_lock_is_released_when_the_block_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), job_lock(out):
        raise RuntimeError("boom")
    assert current_holder(out) is None
    with job_lock(out):
        pass

"""Kill -9 at many moments, resume: exactly one row per (image, task), none missing, same texts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogbatch.store import prepare_output, read_results
from tests.e2e.conftest import make_images

pytestmark = pytest.mark.slow


def _start(job: Path, output: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cogbatch", "run", str(job), "--output", str(output), "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _parts(output: Path) -> int:
    return len(list(output.glob("part-*.parquet")))


def _kill_when(proc: subprocess.Popen, output: Path, parts: int, timeout: float = 120) -> None:
    """SIGKILL the run once `parts` part files are visible (0: as soon as it has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _parts(output) >= parts:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _texts(output: Path) -> dict[tuple[str, str], str]:
    rows = read_results(output).to_pylist()
    keys = [(r["image_id"], r["task"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return {(r["image_id"], r["task"]): r["text"] for r in rows}


def test_kill_nine_anywhere_then_resume(tmp_path, job_factory):
    make_images(tmp_path / "images", 24)
    job = job_factory(flush_rows=2, batch_size=2)
    reference = tmp_path / "reference"
    assert _start(job, reference).wait(timeout=600) == 0
    expected = _texts(reference)
    assert len(expected) == 48

    out = tmp_path / "out"
    crashes = [
        ("during the first part write, before its rename", {"COGBATCH_FAULT": "part-temp-written"}, None),
        ("right after a part's rename", {"COGBATCH_FAULT": "part-renamed"}, None),
        ("while starting up / loading the model", None, 0),
        ("after the next part", None, 1),
        ("half way", None, 12),
    ]
    for what, env, parts in crashes:
        before = _parts(out) if out.exists() else 0
        proc = _start(job, out, env)
        if parts is None:
            assert proc.wait(timeout=600) == -signal.SIGKILL, f"{what}: the crash point was not reached"
        else:
            _kill_when(proc, out, before + parts)
        if out.exists():  # whatever the moment, what is visible is complete and unique
            _texts(out)

    sigterm = _start(job, out)
    _kill_when_term(sigterm, out, _parts(out) + 1)
    assert sigterm.returncode in (143, 0), sigterm.stderr.read().decode()

    final = _start(job, out)
    assert final.wait(timeout=600) == 0, final.stderr.read().decode()
    prepare_output(out)
    assert not list(out.glob(".tmp-*"))
    assert _texts(out) == expected


def _kill_when_term(proc: subprocess.Popen, output: Path, parts: int) -> None:
    """SIGTERM once a new part is visible: the run finishes its batch, flushes and exits 143."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _parts(output) < parts:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)

"""`cogbatch.model.quant.writeback`: a first load returns before its cache entry is written, and a write
that fails or is killed half-way leaves no entry (only a temp dir, removed by the next write)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import torch

import cogbatch.model.quant.cachefile as CF
import cogbatch.model.quant.loader as Q
import cogbatch.model.quant.writeback as W
from tests.unit.quant.helpers import load, logits


def _wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _entries(cache_dir: Path) -> list[str]:
    quantized = cache_dir / "quantized"
    return sorted(p.name for p in quantized.iterdir()) if quantized.is_dir() else []


def test_the_run_does_not_wait_for_the_cache_write(ckpt, cache_dir, monkeypatch):
    """The load returns with the entry still being written; a second load meanwhile waits for the entry
    (the writer holds the builder lock) and reads it instead of quantizing again."""
    gate = threading.Event()
    real = W.write_entry

    def held_write(*args, **kwargs):
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "write_entry", held_write)
    quantized = []
    real_stream = Q.stream_quantize
    monkeypatch.setattr(Q, "stream_quantize", lambda *a: quantized.append(1) or real_stream(*a))
    first = load(ckpt, "int4", cache_dir, wait_for_cache=False)
    report = first.load_report
    assert report.cache_status == W.WRITING and report.cache_write_s == 0
    assert not Path(report.cache_path).exists()
    second: list = []
    reader = threading.Thread(target=lambda: second.append(load(ckpt, "int4", cache_dir, wait_for_cache=False)))
    reader.start()
    time.sleep(0.5)
    assert not second  # waiting for the entry
    gate.set()
    reader.join(120)
    _wait_until(lambda: report.cache_status != W.WRITING)
    assert report.cache_status == "written" and report.cache_write_s > 0 and Path(report.cache_path).is_dir()
    assert second[0].load_report.cache_hit and len(quantized) == 1
    assert torch.equal(logits(second[0]), logits(first))


def test_a_failed_write_leaves_no_entry_and_the_run_goes_on(ckpt, cache_dir, monkeypatch, caplog):
    real, calls = CF._write_all, []

    def failing(fd, view):
        calls.append(1)
        if len(calls) == 5:  # in the middle of the weights
            raise OSError(28, "No space left on device")
        real(fd, view)

    monkeypatch.setattr(CF, "_write_all", failing)
    model = load(ckpt, "int4", cache_dir)
    assert model.load_report.cache_status.startswith("not written (OSError")
    assert "going on without it" in caplog.text
    assert _entries(cache_dir) == []  # neither an entry nor the temp dir
    assert torch.isfinite(logits(model)).all()
    monkeypatch.undo()
    again = load(ckpt, "int4", cache_dir)
    assert again.load_report.cache_status == "written"


_KILLED_WRITER = r"""
import sys, time
import cogbatch.model.quant.cachefile as CF
from cogbatch.model.cogvlm import CogVLM

def stop_here(*args, **kwargs):  # the weights are written and fsynced; the entry is not published yet
    print("WRITTEN", flush=True)
    time.sleep(600)

CF.verify = stop_here
CogVLM.from_pretrained(sys.argv[1], dtype="bfloat16", device="cpu", quantization="int4", cache_dir=sys.argv[2])
print("LOADED", flush=True)
"""


def test_a_writer_killed_half_way_leaves_a_temp_dir_that_the_next_write_removes(ckpt, cache_dir):
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(ckpt), str(cache_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = [child.stdout.readline().strip() for _ in range(2)]
        assert lines == ["LOADED", "WRITTEN"] or lines == ["WRITTEN", "LOADED"], lines  # it ran, and it wrote
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    (temp,) = _entries(cache_dir)
    assert temp.startswith(".") and ".tmp-" in temp  # a writer's temp dir, not an entry
    assert not (cache_dir / "quantized" / temp / CF.CACHE_SIDECAR).exists()
    model = load(ckpt, "int4", cache_dir)  # no entry: quantize, write, and clean up after the dead writer
    assert model.load_report.cache_status == "written"
    assert _entries(cache_dir) == [Path(model.load_report.cache_path).name]

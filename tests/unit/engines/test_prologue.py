"""`cogbatch.engines.prologue` and the stop flag of `progress`: checks made before any work, signals."""

from __future__ import annotations

import os
import signal

import pytest

from cogbatch.engines.progress import StopFlag
from cogbatch.engines.prologue import check_device, check_output
from cogbatch.errors import ConfigError, Interrupted
from cogbatch.job import load_job


def _cfg(tmp_path, **keys):
    (tmp_path / "images").mkdir(exist_ok=True)
    job = {"model": "test/m", "input": {"folder": str(tmp_path / "images")}, "output": str(tmp_path / "out"),
           "tasks": [{"name": "t", "prompt": "x"}], **keys}  # fmt: skip
    return load_job(job, pipeline=None)


def test_cuda_asked_for_without_cuda_is_a_config_error(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: cuda:1 was asked for, but torch sees no CUDA device"):
        check_device(_cfg(tmp_path, device="cuda:1"))
    check_device(_cfg(tmp_path, device="cpu"))
    check_device(_cfg(tmp_path, device="auto"))


def test_an_output_that_cannot_be_created_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, output="/proc/cogbatch-test/out")
    with pytest.raises(ConfigError, match="output: cannot create /proc/cogbatch-test/out"):
        check_output(cfg)
    check_output(_cfg(tmp_path))
    assert (tmp_path / "out").is_dir()


def test_stop_flag_first_signal_asks_a_second_stops_at_once():
    with StopFlag() as stop:
        stop.check()  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as first:
            stop.check()
        assert first.value.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
        assert second.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

"""`cogbatch.engines.ray_actor`, the parts that need no Ray: a warning said once per run, not once per actor."""

from __future__ import annotations

import logging

from cogbatch.engines.ray_actor import OncePerRun


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("cogbatch.model.quantize", level, __file__, 1, message, None, None)


def test_the_first_actor_to_give_a_warning_gives_it_and_errors_always_pass(tmp_path):
    first, second = OncePerRun(tmp_path / "said"), OncePerRun(tmp_path / "said")  # two actors of one run
    fallback, error = _record(logging.WARNING, "int4 kernel: dequantize fallback"), _record(logging.ERROR, "failed")
    assert first.filter(fallback)
    assert not second.filter(fallback) and not first.filter(fallback)
    assert second.filter(_record(logging.WARNING, "out of memory: going on one request at a time"))
    assert first.filter(error) and second.filter(error)
    assert OncePerRun(tmp_path / "another run").filter(fallback)

"""`cogbatch.engines.progress`: images done as requests finish, on a terminal and in a log; the load's bytes."""

from __future__ import annotations

import io
import logging
import re

import pytest

from cogbatch.engines.progress import INTERVAL_ENV, LoadProgress, Progress, _duration, progress_interval


class FakeTerminal(io.StringIO):
    """What tqdm writes to a terminal, kept: each redraw starts with a carriage return."""

    def isatty(self) -> bool:
        return True


def _frames(text: str, total: int) -> list[int]:
    """The image counts the bar showed, frame by frame."""
    return [int(n) for n in re.findall(rf"(\d+)/{total} \[", text)]


def test_an_image_is_done_when_the_last_of_its_requests_is():
    progress = Progress(["a", "a", "b", "c", "c"], quiet=True)
    assert (progress.images_total, progress.requests_total) == (3, 5)
    progress.request_done("a")
    assert progress.images == 0
    progress.request_done("c", error=True)
    progress.request_done("a")
    progress.request_done("c")
    assert (progress.images, progress.requests, progress.errors) == (2, 4, 1)
    progress.close()


def test_a_terminal_gets_a_bar_that_moves_per_image_with_rate_eta_and_errors():
    term = FakeTerminal()
    ids = [f"img{i}" for i in range(12) for _ in range(2)]  # 12 images, 2 requests each
    progress = Progress(ids, stream=term, interval=0)
    progress.start()
    for i in range(12):
        progress.request_done(f"img{i}")
        progress.request_done(f"img{i}", error=i == 3)
    progress.close()
    out = term.getvalue()
    frames = _frames(out, 12)
    assert frames == sorted(frames) and set(frames) == set(range(13))  # 0/12, then a frame per image
    assert "img/s" in out and "<" in out  # tqdm's rate and ETA
    assert "errors 1" in out.rsplit("\r", 1)[-1]


def test_without_a_terminal_a_line_comes_at_the_start_then_every_interval(caplog):
    ids = [f"img{i}" for i in range(12)]
    with caplog.at_level(logging.INFO, logger="cogbatch"):
        progress = Progress(ids, stream=io.StringIO(), interval=0)
        progress.start()  # the model is loaded: the first line now, not after 30 s
        assert caplog.messages == ["0/12 images (0%), errors 0"]
        for i in ids:
            progress.request_done(i)
        progress.close()
    counts = [int(m.split("/")[0]) for m in caplog.messages]
    assert counts == list(range(13))  # one line per image; close adds none when the last one is current
    assert re.fullmatch(r"5/12 images \(42%\), [\d.]+ images/s, ETA \d+ (s|min \d\d s), errors 0", caplog.messages[5])
    assert caplog.messages[-1].startswith("12/12 images (100%)") and "ETA" not in caplog.messages[-1]


def test_without_a_terminal_lines_are_spaced_by_the_interval(caplog):
    with caplog.at_level(logging.INFO, logger="cogbatch"):
        progress = Progress([f"img{i}" for i in range(50)], stream=io.StringIO(), interval=3600)
        for i in range(50):
            progress.request_done(f"img{i}")  # starts the progress implicitly
        progress.close()
    assert caplog.messages[0] == "0/50 images (0%), errors 0"
    assert caplog.messages[1].startswith("50/50 images (100%)") and len(caplog.messages) == 2  # the last, at close


def test_quiet_shows_nothing_but_still_counts(caplog):
    term = FakeTerminal()
    with caplog.at_level(logging.INFO, logger="cogbatch"):
        progress = Progress(["a", "b"], quiet=True, stream=term, interval=0)
        progress.start()
        progress.request_done("a", error=True)
        progress.close()
    assert term.getvalue() == "" and caplog.messages == []
    assert (progress.images, progress.errors) == (1, 1)


def test_the_load_reports_bytes_on_a_terminal_and_starts_over_per_source():
    term = FakeTerminal()
    with LoadProgress(stream=term, interval=0, show_after=0) as on_bytes:
        for done in range(0, 2**20 + 1, 2**17):
            on_bytes("checkpoint", done, 2**20)
        first = on_bytes.bar
        on_bytes("quantized-weights cache", 5, 50)
        assert on_bytes.bar is not first and on_bytes.bar.total == 50
    assert on_bytes.bar is None
    out = term.getvalue()
    assert "reading checkpoint: 100%" in out and "1.00M/1.00M" in out and "reading quantized-weights cache" in out


def test_the_load_logs_a_line_per_interval_without_a_terminal(caplog, monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("cogbatch.engines.progress.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="cogbatch"), LoadProgress(stream=io.StringIO(), interval=15) as on_bytes:
        for done in range(0, 2**30 + 1, 2**28):  # 5 calls, 10 s apart
            on_bytes("checkpoint", done, 2**30)
    assert caplog.messages == ["loading: 512.0 MiB of 1.0 GiB read from the checkpoint (50%)"]


def test_the_interval_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert progress_interval() == 30
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert progress_interval() == 0.5
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with caplog.at_level(logging.WARNING, logger="cogbatch"):
        assert progress_interval() == 30
    assert "COGBATCH_PROGRESS_INTERVAL='soon' is not a number of seconds" in caplog.text


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4 s"), (200, "3 min 20 s"), (7500, "2 h 05 min")])
def test_durations_read_at_a_glance(seconds, text):
    assert _duration(seconds) == text


@pytest.mark.parametrize(
    ("quantization", "shown"), [("int4", "int4-g128, "), ("none+kv8", "none+kv8, "), ("none", "")]
)
def test_the_loading_line_names_the_quantization_and_an_8bit_kv_cache(tmp_path, quantization, shown):
    """`loading model ... (int4-g128, float32 on cpu)`: unquantized weights with an 8-bit KV cache say so too."""
    from cogbatch.engines.progress import describe_source
    from tests.unit.quant.helpers import job_with

    line = describe_source(job_with(tmp_path, quantization).source)
    assert re.search(rf"(^|; ){re.escape(shown)}\w+ on cpu", line), line

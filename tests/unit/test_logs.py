"""`cogbatch.logs`: three levels of talk on stderr, library warnings included, lines kept off progress bars."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from cogbatch.logs import StderrHandler, configure_logging, levels

NAMES = ("", "cogbatch", "cogbatch.model", "py.warnings")


@pytest.fixture
def clean_logging():
    """The process's logging as it was, after the test (levels, root handlers, captured warnings)."""
    saved = {name: logging.getLogger(name).level for name in NAMES}
    handlers = list(logging.getLogger().handlers)
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().handlers = handlers
    logging.captureWarnings(False)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_normal_shows_notes_and_warnings_but_not_the_loaders_internals():
    normal, quiet, verbose = levels(False, False), levels(True, False), levels(False, True)
    assert normal["cogbatch"] == logging.INFO and normal["cogbatch.model"] == logging.WARNING
    assert normal[""] == logging.WARNING  # libraries' warnings
    assert set(quiet.values()) == {logging.ERROR}
    assert verbose["cogbatch.model"] <= logging.INFO


def test_an_own_process_gets_one_handler_and_quiet_silences_library_warnings(clean_logging, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    configure_logging(quiet=True, own_process=True)
    configure_logging(quiet=True, own_process=True)
    assert sum(isinstance(h, StderrHandler) for h in logging.getLogger().handlers) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    logging.getLogger("cogbatch.model.quantize").warning("int4 kernel: dequantize fallback")
    logging.getLogger("cogbatch").error("an error")
    assert err.getvalue() == "cogbatch: an error\n"


def test_logging_a_host_set_up_is_left_alone(clean_logging):
    """pytest (or an application calling the CLI in-process) configured logging: cogbatch does not add to it."""
    before = {name: logging.getLogger(name).level for name in NAMES}
    assert logging.getLogger().handlers  # pytest's own
    configure_logging(quiet=True)
    assert not any(isinstance(h, StderrHandler) for h in logging.getLogger().handlers)
    assert {name: logging.getLogger(name).level for name in NAMES} == before


def test_a_line_logged_under_a_bar_is_written_above_it(monkeypatch):
    from tqdm import tqdm

    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = StderrHandler()
    bar = tqdm(total=4, file=term, desc="cogbatch", mininterval=0)
    bar.update(1)
    handler.emit(logging.LogRecord("cogbatch", logging.WARNING, __file__, 1, "out of memory", None, None))
    bar.update(1)
    bar.close()
    out = term.getvalue()
    line = out.index("cogbatch: out of memory\n")
    assert out[line - 1] == "\r" and "2/4" in out[line:]  # the bar cleared, the line, the bar below it

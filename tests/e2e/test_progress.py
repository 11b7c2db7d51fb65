"""What `cogbatch run` shows a person: progress per finished image on a terminal and in a log, the summary
on stdout, the load's internals only with --verbose, nothing but errors with --quiet."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

from tests.e2e.conftest import cogbatch_cmd, make_images

SUMMARY_LINE = re.compile(r"^\d+ ok, \d+ failed, \d+ already done; ", re.MULTILINE)
LOAD_INTERNALS = ("peak host RSS", "kernels:", "weights 0.")  # the load report's lines


def _on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `cogbatch` with stderr on a pseudo-terminal of 100 columns: (exit code, stdout, what the terminal got)."""
    exe = shutil.which("cogbatch")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "cogbatch", *args]
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=terminal, env={**os.environ, **env})
    os.close(terminal)
    screen = b""
    while True:
        try:
            data = os.read(controller, 1 << 16)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not data:
            break
        screen += data
    os.close(controller)
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=600), out, screen.decode(errors="replace")


def test_a_terminal_sees_a_bar_that_moves_per_finished_image(tmp_path, job_factory):
    make_images(tmp_path / "images", 12)  # one chunk of the worker: it used to jump from 0 to 12 at once
    code, out, screen = _on_a_terminal("run", str(job_factory()), env={"COGBATCH_PROGRESS_INTERVAL": "0"})
    assert code == 0, screen
    counts = [int(n) for n in re.findall(r"(\d+)/12 \[", screen)]
    assert counts == sorted(counts) and set(range(13)) <= set(counts), screen  # a frame per image, in order
    assert re.search(r"12/12 \[\d\d:\d\d<00:00, +[\d.]+(img/s|s/img), errors 0\]", screen)
    assert screen.index("cogbatch: loading model ") < screen.index("0/12 [")
    for line in re.finditer(r"cogbatch: (?!\s*\d+%\|)", screen):  # log lines, not the bar's frames
        assert line.start() == 0 or screen[line.start() - 1] == "\n", screen  # never written onto the bar
    assert SUMMARY_LINE.search(out) and not SUMMARY_LINE.search(screen)  # the summary: stdout


def test_without_a_terminal_a_line_per_interval_with_rate_and_eta(tmp_path, job_factory):
    make_images(tmp_path / "images", 12)
    res = cogbatch_cmd("run", str(job_factory()), env={"COGBATCH_PROGRESS_INTERVAL": "0"})
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if re.match(r"cogbatch: \d+/12 images", line)]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(13))  # the first: before any image
    assert all(re.search(r"[\d.]+ images/s, ETA \d+", line) for line in lines[1:-1]), lines
    assert "ETA" not in lines[-1] and "\x1b" not in res.stderr and "\r" not in res.stderr
    assert SUMMARY_LINE.search(res.stdout) and not SUMMARY_LINE.search(res.stderr)
    assert not any(part in res.stderr for part in LOAD_INTERNALS)  # the load report is --verbose's


def test_quiet_leaves_stderr_empty_and_verbose_shows_the_load(tmp_path, job_factory):
    """int4 on fp32 runs quanto's fallback, which warns: --quiet keeps that off stderr too."""
    make_images(tmp_path / "images", 2)
    job = job_factory(quantization="int4", dtype="fp32")
    quiet = cogbatch_cmd("run", str(job), "--quiet", "--output", str(tmp_path / "quiet"))
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert SUMMARY_LINE.search(quiet.stdout) and "-> " + str(tmp_path / "quiet") in quiet.stdout
    loud = cogbatch_cmd("run", str(job), "--verbose", "--output", str(tmp_path / "verbose"))
    assert loud.returncode == 0, loud.stderr
    assert all(part in loud.stderr for part in LOAD_INTERNALS) and "dequantize fallback" in loud.stderr
    assert "cogbatch: loading model " in loud.stderr and SUMMARY_LINE.search(loud.stdout)
    both = cogbatch_cmd("run", str(job), "--quiet", "--verbose")
    assert both.returncode == 2 and "exclude each other" in both.stderr

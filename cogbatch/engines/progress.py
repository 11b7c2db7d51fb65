"""What a run shows and how it stops: progress on stderr (the model load's bytes, then images done), and
the stop flag that signals set.

First Ctrl-C / SIGTERM: the batch in flight finishes, its rows are flushed, the run exits 130 / 143.
A second one stops at once (`Interrupted`); rows reach the output only as whole part files, so even
then the output stays complete and resumable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

from cogbatch.errors import Interrupted

log = logging.getLogger("cogbatch")


class StopFlag:
    """First Ctrl-C / SIGTERM: finish the batch in flight, flush, exit. A second one: stop at once.

    "At once" raises `Interrupted` wherever the main thread is (the CLI exits 130 / 143).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker): no handlers
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.warning("stopping after the batch in flight (signal %d); press Ctrl-C again to stop at once", signum)

    def check(self) -> None:
        """Raise `Interrupted` once a signal came: for loops before any work (the input scan)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def handle_again(self) -> None:
        """Take the signals back (a library that installed its own handlers meanwhile: `ray.init`)."""
        for s in self.previous:
            with contextlib.suppress(ValueError):
                signal.signal(s, self._handle)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


INTERVAL_ENV = "COGBATCH_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def progress_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal: $COGBATCH_PROGRESS_INTERVAL, else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        log.warning("%s=%r is not a number of seconds >= 0; using %g", INTERVAL_ENV, raw, DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S
    return value


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (a bar redraws in place there; elsewhere, lines)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _duration(seconds: float) -> str:
    """`42 s`, `3 min 20 s`, `2 h 05 min`: an ETA a person reads at a glance."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Images done of the run's images, moving as each request's row is made; nothing when quiet.

    On a terminal a tqdm bar (its images/s and ETA), with the error rows so far beside it; otherwise
    (cron, a log file) a line every `interval` seconds with done / total, rate and ETA: the first when
    the work starts (after the model load), the last when it ends. An image is done when the last of
    its requests is. Rates count from `start`, so the model load does not dilute them.
    """

    def __init__(
        self, image_ids: Iterable[str], quiet: bool = False, *, stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:  # fmt: skip
        self.left = Counter(image_ids)  # image id -> its requests not done yet (one entry per pending request)
        self.images_total = len(self.left)
        self.requests_total = sum(self.left.values())
        self.images = self.requests = self.errors = 0
        self.quiet = quiet
        self.stream = stream  # None: sys.stderr when the work starts
        # Decided now, before an engine may pass stderr through a pipe (`ray_cluster.without_ray_records`)
        self.tty = not quiet and is_terminal(stream or sys.stderr)
        self.interval = progress_interval() if interval is None else interval
        self.bar: Any = None
        self.started: float | None = None
        self.last_line = 0.0
        self.shown = -1  # images done at the last line

    def start(self) -> None:
        """The work begins (the model is loaded): the bar appears, or the first line is written."""
        if self.started is not None:
            return
        self.started = time.monotonic()
        if self.quiet:
            return
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.images_total, initial=self.images, unit="img", desc="cogbatch",
                            file=self.stream or sys.stderr, postfix=f"errors {self.errors}",
                            mininterval=min(0.1, self.interval), miniters=1, smoothing=0.1)  # fmt: skip
        else:
            self._line()

    def request_done(self, image_id: str, error: bool = False) -> None:
        """One request's row is made (an error row when `error`); its image is done if it was the last."""
        self.start()
        self.requests += 1
        self.errors += bool(error)
        finished = False
        if image_id in self.left:
            self.left[image_id] -= 1
            if self.left[image_id] <= 0:
                del self.left[image_id]
                self.images += 1
                finished = True
        if self.bar is not None:
            if error:
                self.bar.set_postfix_str(f"errors {self.errors}", refresh=not finished)
            if finished:
                self.bar.update(1)
        elif finished and not self.quiet and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def describe(self) -> str:
        """`5/12 images (42%), 1.52 images/s, ETA 5 s, errors 0`: the line written without a terminal."""
        done, total = self.images, self.images_total
        text = f"{done}/{total} images ({100 * done / total if total else 100:.0f}%)"
        elapsed = time.monotonic() - self.started if self.started is not None else 0.0
        if done and elapsed > 0:
            rate = done / elapsed
            text += f", {rate:.2f} images/s"
            if done < total:
                text += f", ETA {_duration((total - done) / rate)}"
        return text + f", errors {self.errors}"

    def _line(self) -> None:
        self.last_line = time.monotonic()
        self.shown = self.images
        log.info("%s", self.describe())

    def close(self) -> None:
        """The work is over: the bar closes, or a last line says where it ended (unless the last one did)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.started is not None and not self.quiet and self.shown != self.images:
            self._line()


class LoadProgress:
    """The model load, in bytes read: the callback the loader calls with (what, bytes done, bytes total).

    `what` is what is being read (the checkpoint, or the quantized-weights cache); a new `what` starts
    over. On a terminal a tqdm bar, shown only when the load takes more than a second; otherwise a line
    every `interval` seconds while it lasts; nothing when quiet.
    """

    def __init__(
        self, quiet: bool = False, *, stream: TextIO | None = None, interval: float | None = None,
        show_after: float = 1.0,
    ) -> None:  # fmt: skip
        self.quiet = quiet
        self.show_after = show_after  # seconds before a bar appears: a load that fast needs none
        self.stream = stream or sys.stderr
        self.tty = is_terminal(self.stream)
        self.interval = progress_interval() if interval is None else interval
        self.what: str | None = None
        self.bar: Any = None
        self.last_line = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.quiet or total <= 0:
            return
        now = time.monotonic()
        if what != self.what:
            self.close()
            self.what, self.last_line = what, now
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=f"reading {what}", unit="B", unit_scale=True, unit_divisor=1024,
                                file=self.stream, delay=self.show_after,
                                mininterval=min(0.1, self.interval))  # fmt: skip
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif done < total and now - self.last_line >= self.interval:
            self.last_line = now
            share = 100 * done / total
            log.info("loading: %s of %s read from the %s (%.0f%%)", _size(done), _size(total), what, share)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> LoadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_source(source: Any) -> str:
    """What loading a job's model reads, for the `loading model ...` line: the checkpoint's files and size."""
    from pathlib import Path

    quant = source.quantization.label() if source.quantization is not None else "none"
    how = f"{quant}, " if quant != "none" else ""  # `none+kv8`: unquantized weights, but an 8-bit KV cache
    how += f"{source.compute_dtype()} on {source.torch_device()}"
    if source.is_tiny:
        where = source.tiny_dir()
    else:
        where = Path(str(source.model)).expanduser()
        if not where.is_dir():
            return f"hub id {source.model}, from the Hugging Face cache or downloaded; {how}"
    files = sorted(where.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    what = f"{where}: {len(files)} safetensors file{'s' if len(files) != 1 else ''}, {_size(size)}; {how}"
    if quant:
        what += "; the quantized-weights cache is read instead when it holds this model"
    return what


def stop_at_once_on_signals() -> dict[int, Any]:
    """Until a run installs its StopFlag, Ctrl-C / SIGTERM stop at once with `Interrupted` (exit 130 / 143).

    Nothing has started then (config, imports, the lock), so stopping at once loses nothing; without
    this, SIGTERM would kill the process with no exit code of ours and Ctrl-C would exit 1. Returns
    the handlers it replaced (none when not called from the main thread, where Python allows none).
    """

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):
            previous[s] = signal.signal(s, stop)
    return previous

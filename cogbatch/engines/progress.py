"""What a run shows and how it stops: progress on stderr, and the stop flag that signals set.

First Ctrl-C / SIGTERM: the batch in flight finishes, its rows are flushed, the run exits 130 / 143.
A second one stops at once (`Interrupted`); rows reach the output only as whole part files, so even
then the output stays complete and resumable.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from typing import Any

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


class Progress:
    """A tqdm bar on a terminal; periodic log lines otherwise (cron logs stay readable); nothing if quiet.

    The bar counts requests (its rate and ETA); images done and errors so far are shown beside it.
    """

    def __init__(self, total: int, quiet: bool, images: int | None = None) -> None:
        from tqdm import tqdm

        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="req", desc="cogbatch", file=sys.stderr, disable=not self.tty)
        self.total, self.done, self.errors = total, 0, 0
        self.images_total, self.images = images, 0
        self.last_log = time.monotonic()

    def update(self, n: int, errors: int, images: int = 0) -> None:
        self.done += n
        self.errors += errors
        self.images += images
        self.bar.update(n)
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        if not self.tty and not self.quiet and time.monotonic() - self.last_log > 30:
            self.last_log = time.monotonic()
            log.info("%d/%d requests done, %s", self.done, self.total, self.postfix())

    def postfix(self) -> str:
        if self.images_total is None:  # an engine that counts requests only
            return f"errors {self.errors}"
        return f"images {self.images}/{self.images_total}, errors {self.errors}"

    def close(self) -> None:
        self.bar.close()


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

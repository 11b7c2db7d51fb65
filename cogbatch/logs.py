"""What cogbatch says on stderr, at three levels: `--quiet`, normal, `--verbose`.

    configure_logging(quiet=False, verbose=False)   # the CLI; each Ray actor with its driver's settings

Normal: cogbatch's notes and progress, and every library's warnings; not the model loader's internals
(read / quantize / pack times, weight bytes, peak RSS, kernels: `cogbatch.model` at INFO), which
`--verbose` adds. Quiet: errors only. Python warnings go through logging (`py.warnings`), so the same
levels govern a library's `warnings.warn` and its log records, and `--quiet` silences both.
Everything cogbatch prints about its work goes to stderr; stdout is for the summary and data.
"""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "cogbatch: %(message)s"


def levels(quiet: bool, verbose: bool) -> dict[str, int]:
    """The level of each logger that matters: the root (libraries), cogbatch, the model loader."""
    if quiet:
        return {"": logging.ERROR, "cogbatch": logging.ERROR, "cogbatch.model": logging.ERROR}
    if verbose:
        return {"": logging.INFO, "cogbatch": logging.DEBUG, "cogbatch.model": logging.DEBUG}
    return {"": logging.WARNING, "cogbatch": logging.INFO, "cogbatch.model": logging.WARNING}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes; above a progress bar while one is shown.

    A line written while a tqdm bar is on the terminal would land on the bar's line; `tqdm.write`
    clears the bars, writes the line and draws them again below it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it: stderr stays the target
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(
    quiet: bool = False, verbose: bool = False, *, own_process: bool = False
) -> StderrHandler | None:
    """Set the levels above and one stderr handler on the root logger (once per process, however often called).

    Logging that a host configured before (a test runner, an application calling the CLI in-process)
    is left as it is (None is returned), unless the process is cogbatch's own (`own_process`: a Ray actor).
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StderrHandler)), None)
    if root.handlers and handler is None and not own_process:
        return None
    if handler is None:
        handler = StderrHandler()
        root.addHandler(handler)
    for name, level in levels(quiet, verbose).items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(True)
    quiet_known_warnings()
    return handler


def quiet_known_warnings() -> None:
    """Warnings that say nothing a user can act on, for every process that decodes images or loads a model.

    Pillow warns once per process about odd EXIF blocks (such an image still decodes fine), and above
    89 MP on every image (`max_pixels` is the limit here). Called by the run itself too, so that the
    Python API and the Ray actors filter what the CLI filters.
    """
    warnings.filterwarnings("ignore", message="(Possibly )?[Cc]orrupt EXIF", category=UserWarning)
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

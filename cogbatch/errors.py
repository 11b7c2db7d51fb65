"""Every error cogbatch raises on purpose, and the one mapping from an error to the code a process exits with.

    CogbatchError                     1   aborted (a bug, a failed Ray job: resumable)
      UserError                       2   the user's to fix; nothing was done
        ConfigError (ValueError)          job / pipeline file, override, config.json
        CheckpointError (ValueError)      a checkpoint that cannot be used
        SettingsChanged                   rows made with other settings (--redo-changed)
        DoesNotFit                        not even one request fits under vram_ceiling
        EngineError                       the engine cannot run as asked (missing extra, --workers)
        ResultFileError                   a file named like a part that is not one
        ExportError, DestinationError     an export that cannot be made as asked
        GalleryError                      a gallery that cannot be made (no results, unknown task, DEST)
        CronError (ValueError)            an invalid cron expression
        UnsafePathError                   a path a crontab line cannot hold
      JobLocked                      75   another run holds the output (EX_TEMPFAIL: try again later)
      ScheduleError                   1   crontab or flock missing or failing
      RayRunFailed (RuntimeError)     1   the Ray job failed (an actor out of restarts)
      ImageError, CacheError              never leave the process: a row's reason, a cache rebuilt
    Interrupted (KeyboardInterrupt) 130 / 143   a signal (SIGINT / SIGTERM) stopped the process

The base classes live in `cogbatch.model.errors` (the model package is the leaf every package may import).
The code is a class attribute, `exit_code`, so the CLI and the run history (`history.run_record`) ask the
same `exit_code_for` and can never disagree. Cheap to import: no torch, no pyarrow.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from cogbatch.model.errors import CacheError, CheckpointError, CogbatchError, ConfigError, UserError

__all__ = [
    "EXIT_ABORTED",
    "EXIT_CONFIG",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_ROW_ERRORS",
    "EXIT_SIGNAL",
    "CacheError",
    "CheckpointError",
    "CogbatchError",
    "ConfigError",
    "CronError",
    "DestinationError",
    "DoesNotFit",
    "EngineError",
    "ExportError",
    "GalleryError",
    "ImageError",
    "Interrupted",
    "JobLocked",
    "RayRunFailed",
    "ResultFileError",
    "ScheduleError",
    "SettingsChanged",
    "UnsafePathError",
    "UserError",
    "describe_holder",
    "exit_code_for",
]

EXIT_OK = 0
EXIT_ABORTED = CogbatchError.exit_code  # 1
EXIT_CONFIG = UserError.exit_code  # 2: configuration or usage error, nothing was done
EXIT_ROW_ERRORS = 3  # --fail-on-error and some rows are errors
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the output
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it


class SettingsChanged(UserError):
    """Existing rows were made with other settings and the user did not ask to redo them."""


class DoesNotFit(UserError):
    """Even one request does not fit under the ceiling; the message gives needed and available memory."""


class EngineError(UserError):
    """The engine cannot run as asked (missing extra, impossible --workers)."""


class ResultFileError(UserError):
    """A file named like a part that is not a cogbatch result file: truncated, corrupt, or another tool's Parquet.

    The user put it there and must move it. Reading on would crash in pyarrow, or worse, count and export
    rows that are not results (missing columns read as nulls).
    """

    def __init__(self, path: Path, reason: str) -> None:
        what = f"{path} is not a readable cogbatch result file ({reason})"
        super().__init__(f"{what}; move it out of the output directory")
        self.path = path


class ExportError(UserError):
    """A request that cannot be exported as asked (the CLI shows it as a usage error)."""


class DestinationError(ExportError):
    """DEST cannot be created or written (read-only file system, a file in the way, disk full), with the path
    and the system's reason."""


class GalleryError(UserError):
    """A gallery that cannot be made as asked: no results, an unknown task, an unwritable destination."""


class CronError(UserError, ValueError):
    """An invalid cron expression; the message names the field."""


class ScheduleError(CogbatchError):
    """crontab or flock is missing or failed; the message says what to install or what went wrong."""


class UnsafePathError(ScheduleError, UserError):
    """A path that cannot go into a crontab line safely (a line break would start a new entry): exit 2."""


class JobLocked(CogbatchError):
    """Another live process is running a job on this output dataset."""

    exit_code = EXIT_LOCKED

    def __init__(self, output: Path, holder: dict[str, Any] | None) -> None:
        self.output = output
        self.holder = holder or {}
        super().__init__(f"another cogbatch run is writing to {output}: {describe_holder(self.holder)}")


class RayRunFailed(CogbatchError, RuntimeError):
    """The Ray job itself failed (an actor out of restarts, a lost node): the run aborts, resumable."""


class ImageError(CogbatchError):
    """An image that cannot be read or decoded, with a short reason (e.g. 'file not found', 'not an image',
    'truncated image data', 'image too large: 400000000 pixels > limit 178956970').

    The reason is written verbatim into a result row, so it is one line, without the path (the row has its
    own `path` column) and without a traceback. It never ends a run: a bad image is an error row.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Interrupted(KeyboardInterrupt):
    """A signal stopped the process at once: before the run's loop began, or a second Ctrl-C / SIGTERM.

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it; it carries the signal
    so that SIGTERM ends with 143 and Ctrl-C with 130 however deep it was raised.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def describe_holder(info: dict[str, Any]) -> str:
    """`pid 4242 on host gpu1, started 2025-01-02T02:00:00Z: cogbatch run jobs/caption.yaml` (JobLocked, status)."""
    if not info.get("pid"):
        return "holder unknown (it has only just started)"
    text = f"pid {info['pid']} on host {info.get('host', '?')}"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f": {info['command']}"
    return text


def exit_code_for(error: BaseException) -> int:
    """The exit code a command ends with when it raised `error`: by class (`exit_code`), signals by number."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGNAL.get(getattr(error, "signum", signal.SIGINT), EXIT_SIGNAL[signal.SIGINT])
    if isinstance(error, CogbatchError):
        return type(error).exit_code
    return EXIT_ABORTED

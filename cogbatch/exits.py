"""Exit codes of `cogbatch run`, and the one mapping from an error to the code a run ends with.

The CLI (`cli._abort`) and the run history (`history.run_record`) both ask `exit_code_for`, so the code
a user sees and the code `runs.jsonl` records can never disagree. Cheap to import: no torch, no pyarrow
(the CLI imports it for `--help`-fast commands, and error classes are looked up only in modules that
are already loaded: an error of a module nobody imported cannot have been raised).
"""

from __future__ import annotations

import signal
import sys

EXIT_OK = 0
EXIT_ABORTED = 1
EXIT_CONFIG = 2  # configuration or usage error: nothing was done
EXIT_ROW_ERRORS = 3  # --fail-on-error and some rows are errors
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the output
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it

# Errors that are the user's to fix (a bad config, model source, ceiling or engine option): exit 2.
_USER_ERRORS = (
    ("cogbatch.config", "ConfigError"),
    ("cogbatch.runner", "SettingsChanged"),
    ("cogbatch.planner", "DoesNotFit"),
    ("cogbatch.engines", "EngineError"),
    ("cogbatch.model.weights", "CheckpointError"),
    ("cogbatch.model.config", "ConfigError"),
)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the process at once: before the run's loop began, or a second Ctrl-C / SIGTERM.

    A KeyboardInterrupt, so that no `except Exception` on the way swallows it; it carries the signal
    so that SIGTERM ends with 143 and Ctrl-C with 130 however deep it was raised.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _loaded_class(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def is_user_error(error: BaseException) -> bool:
    """A configuration, model-source, memory-ceiling or engine-option problem (exit 2)."""
    classes = tuple(c for c in (_loaded_class(m, n) for m, n in _USER_ERRORS) if c is not None)
    return bool(classes) and isinstance(error, classes)


def exit_code_for(error: BaseException) -> int:
    """The exit code `cogbatch run` ends with when the run raised `error`."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGNAL.get(getattr(error, "signum", signal.SIGINT), EXIT_SIGNAL[signal.SIGINT])
    locked = _loaded_class("cogbatch.lock", "JobLocked")
    if locked is not None and isinstance(error, locked):
        return EXIT_LOCKED
    return EXIT_CONFIG if is_user_error(error) else EXIT_ABORTED

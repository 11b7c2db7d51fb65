"""`cogbatch.exits`: the one error -> exit code mapping that the CLI and the run history share."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from cogbatch.exits import EXIT_ABORTED, EXIT_CONFIG, EXIT_LOCKED, Interrupted, exit_code_for


def test_user_errors_exit_2_and_bugs_exit_1():
    from cogbatch.config import ConfigError
    from cogbatch.engines import EngineError
    from cogbatch.model.config import ConfigError as ModelConfigError
    from cogbatch.model.weights import CheckpointError
    from cogbatch.planner import DoesNotFit
    from cogbatch.runner import SettingsChanged

    for error in (ConfigError("x"), SettingsChanged("x"), DoesNotFit("x"), EngineError("x"), CheckpointError("x"),
                  ModelConfigError("x")):  # fmt: skip
        assert exit_code_for(error) == EXIT_CONFIG, error
    for error in (ValueError("x"), RuntimeError("x"), OSError("x")):
        assert exit_code_for(error) == EXIT_ABORTED, error


def test_locked_and_signals():
    from cogbatch.lock import JobLocked

    assert exit_code_for(JobLocked(Path("out"), None)) == EXIT_LOCKED == 75
    assert exit_code_for(KeyboardInterrupt()) == 130
    assert exit_code_for(Interrupted(signal.SIGINT)) == 130
    assert exit_code_for(Interrupted(signal.SIGTERM)) == 143
    assert isinstance(Interrupted(), KeyboardInterrupt)  # no `except Exception` on the way swallows it


def test_classifying_an_error_imports_nothing_heavy():
    code = (
        "import sys\nfrom cogbatch.exits import exit_code_for\n"
        "assert exit_code_for(ValueError('x')) == 1\n"
        "print('HEAVY', [m for m in ('torch', 'pyarrow', 'cogbatch.model.weights') if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr

"""`cogbatch.errors`: one hierarchy, and the one error -> exit code mapping the CLI and the run history share."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cogbatch.errors as errors
from cogbatch.errors import EXIT_ABORTED, EXIT_CONFIG, EXIT_LOCKED, Interrupted, exit_code_for

# Every class the package raises on purpose, with the code a command that ends with it exits with.
EXPECTED = {
    "CogbatchError": 1,
    "UserError": 2,
    "ConfigError": 2,
    "CheckpointError": 2,
    "SettingsChanged": 2,
    "DoesNotFit": 2,
    "EngineError": 2,
    "ResultFileError": 2,
    "ExportError": 2,
    "DestinationError": 2,
    "GalleryError": 2,
    "CronError": 2,
    "UnsafePathError": 2,
    "ScheduleError": 1,
    "JobLocked": 75,
    "RayRunFailed": 1,
    "ImageError": 1,
    "CacheError": 1,
}


def _instance(cls: type[BaseException]) -> BaseException:
    if cls is errors.ResultFileError:
        return cls(Path("part-x-00000.parquet"), "truncated")
    if cls is errors.JobLocked:
        return cls(Path("out"), None)
    return cls("x")


def test_every_error_class_is_listed_and_maps_by_class():
    classes = {n: c for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.CogbatchError)}
    assert set(classes) == set(EXPECTED)  # a new class must say its exit code here
    for name, cls in classes.items():
        assert exit_code_for(_instance(cls)) == EXPECTED[name], name


@pytest.mark.parametrize("name", ["ConfigError", "CheckpointError", "CronError"])
def test_user_errors_of_plain_values_are_value_errors_too(name):
    assert isinstance(_instance(getattr(errors, name)), ValueError)


def test_user_errors_exit_2_and_bugs_exit_1():
    for error in (errors.ConfigError("x"), errors.SettingsChanged("x"), errors.DoesNotFit("x"),
                  errors.EngineError("x"), errors.CheckpointError("x")):  # fmt: skip
        assert exit_code_for(error) == EXIT_CONFIG, error
    for error in (ValueError("x"), RuntimeError("x"), OSError("x")):
        assert exit_code_for(error) == EXIT_ABORTED, error


def test_the_model_raises_the_same_classes():
    from cogbatch.model import errors as model_errors

    for name in ("CogbatchError", "UserError", "ConfigError", "CheckpointError", "CacheError"):
        assert getattr(model_errors, name) is getattr(errors, name)


def test_locked_and_signals():
    assert exit_code_for(errors.JobLocked(Path("out"), None)) == EXIT_LOCKED == 75
    assert exit_code_for(KeyboardInterrupt()) == 130
    assert exit_code_for(Interrupted(signal.SIGINT)) == 130
    assert exit_code_for(Interrupted(signal.SIGTERM)) == 143
    assert isinstance(Interrupted(), KeyboardInterrupt)  # no `except Exception` on the way swallows it


def test_classifying_an_error_imports_nothing_heavy():
    code = (
        "import sys\nfrom cogbatch.errors import exit_code_for\n"
        "assert exit_code_for(ValueError('x')) == 1\n"
        "print('HEAVY', [m for m in ('torch', 'pyarrow', 'cogbatch.model.weights') if m in sys.modules])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr

"""The installed `cogbatch` command as a user meets it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import cogbatch

COMMANDS = ["compact", "compare", "demo", "export", "gallery", "plan", "quantize", "run", "schedule", "status"]


def cogbatch_cmd(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("cogbatch")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "cogbatch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_with_a_description():
    res = cogbatch_cmd("--help")
    assert res.returncode == 0
    listing = res.stdout.split("Commands:")[1]
    described = set(re.findall(r"^  (\S+) +\S", listing, flags=re.MULTILINE))  # name, then its description
    assert described == set(COMMANDS)


def test_short_help_flag_and_version():
    assert cogbatch_cmd("-h").returncode == 0
    res = cogbatch_cmd("--version")
    assert res.returncode == 0
    assert cogbatch.__version__ in res.stdout


def test_help_does_not_import_torch():
    """`cogbatch --help` must answer at once: torch and transformers load only inside commands."""
    code = (
        "import sys\nfrom cogbatch.cli import cli\n"
        "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr


def test_json_output_is_a_single_line(capsys):
    from cogbatch.cli import _emit

    _emit({"a": 1, "b": {"c": [1, 2]}}, "human", True, quiet=True)
    out, err = capsys.readouterr()
    assert out == '{"a": 1, "b": {"c": [1, 2]}}\n' and err == ""


def test_a_late_signal_never_turns_the_programs_exit_into_a_kill(tmp_path):
    """Once `run` has returned, the `cogbatch` process is only exiting (interpreter shutdown with torch takes
    a while): a SIGTERM then must leave its exit code alone, not kill it (-15). In-process callers (tests,
    notebooks) get their own handlers back."""
    import signal

    from click.testing import CliRunner

    from cogbatch.cli import _PROGRAM, cli

    bad = tmp_path / "job.yaml"
    bad.write_text("model: [unclosed\n")

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        assert CliRunner().invoke(cli, ["run", str(bad)]).exit_code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
        assert CliRunner().invoke(cli, ["run", str(bad)], obj=_PROGRAM).exit_code == 2
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_unforeseen_failure_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Whatever a command did not turn into a message still ends the executable with one line and an exit
    code; COGBATCH_DEBUG=1 re-raises it for the traceback."""
    import pytest
    import yaml

    import cogbatch.status
    from cogbatch.cli import main

    (tmp_path / "images").mkdir()
    job = tmp_path / "job.yaml"
    keys = {"model": "tiny-random:cogvlm2", "input": {"folder": str(tmp_path / "images")},
            "output": str(tmp_path / "out"), "tasks": [{"name": "c", "prompt": "p"}]}  # fmt: skip
    job.write_text(yaml.safe_dump(keys))

    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(cogbatch.status, "job_status", broken)
    monkeypatch.setattr(sys, "argv", ["cogbatch", "status", str(job)])
    monkeypatch.delenv("COGBATCH_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Error: RuntimeError: boom (set COGBATCH_DEBUG=1 for the traceback)" in err and "Traceback" not in err
    monkeypatch.setenv("COGBATCH_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main()

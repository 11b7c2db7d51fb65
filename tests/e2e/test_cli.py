"""The installed `cogbatch` command as a user meets it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import cogbatch

COMMANDS = ["compact", "demo", "export", "plan", "quantize", "run", "schedule", "status"]


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

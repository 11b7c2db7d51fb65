"""`cogbatch.schedule`: cron validation, the crontab line, install / re-install / change / remove / list.

The crontab is always a fake `crontab` executable first on PATH that keeps the table in a file, so no
test can touch the real one; HOME is a temp dir too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cogbatch import schedule as sched
from cogbatch.cli import cli

FAKE_CRONTAB = """#!/bin/sh
# Fake crontab(1): the table lives in $FAKE_CRONTAB_FILE; only -l and - are supported.
case "$1" in
  -l) [ -f "$FAKE_CRONTAB_FILE" ] || { echo "no crontab for tester" >&2; exit 1; }
      cat "$FAKE_CRONTAB_FILE" ;;
  -) cat > "$FAKE_CRONTAB_FILE" ;;
  *) echo "fake crontab: unsupported arguments: $*" >&2; exit 2 ;;
esac
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def crontab(tmp_path, monkeypatch) -> Path:
    """A fake crontab on PATH (and a fake HOME); returns the file that holds the table."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    _executable(bin_dir / "crontab", FAKE_CRONTAB)
    table = tmp_path / "crontab.txt"
    monkeypatch.setenv("FAKE_CRONTAB_FILE", str(table))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if sched.shutil.which("flock") is None:  # a machine without util-linux: a pass-through fake flock
        _executable(bin_dir / "flock", '#!/bin/sh\nshift 4\nexec "$@"\n')
    return table


@pytest.fixture
def job(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    path = tmp_path / "jobs" / "caption.yaml"
    path.parent.mkdir()
    job = {
        "model": "tiny-random:cogvlm2",
        "input": {"folder": "images"},
        "output": "out/caption",
        "tasks": [{"name": "caption", "prompt": "Describe this image."}],
    }
    path.write_text(yaml.safe_dump(job))
    return path


# -- cron expressions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, normal",
    [
        ("0 2 * * *", "0 2 * * *"),
        ("  0   2 * *   * ", "0 2 * * *"),
        ("*/15 * * * *", "*/15 * * * *"),
        ("0 0-23/2 * * *", "0 0-23/2 * * *"),
        ("5,35 1,13 1-15 * 1-5", "5,35 1,13 1-15 * 1-5"),
        ("0 3 * jan,jul sun", "0 3 * jan,jul sun"),
        ("30 4 1 DEC mon-fri", "30 4 1 DEC mon-fri"),
        ("59 23 31 12 7", "59 23 31 12 7"),
        ("0 0 1 1 0", "0 0 1 1 0"),
        ("@daily", "@daily"),
        ("@HOURLY", "@hourly"),
        ("@weekly", "@weekly"),
        ("@monthly", "@monthly"),
        ("@yearly", "@yearly"),
        ("@reboot", "@reboot"),
    ],
)
def test_valid_cron_expressions(expr, normal):
    assert sched.validate_cron(expr) == normal


@pytest.mark.parametrize(
    "expr, words",
    [
        ("", ["5 fields", "got 0 fields"]),
        ("0 2 * *", ["5 fields", "got 4 fields"]),
        ("0 2 * * * *", ["got 6 fields"]),
        ("60 2 * * *", ["minute", "60", "0-59"]),
        ("0 24 * * *", ["hour", "24", "0-23"]),
        ("0 2 0 * *", ["day-of-month", "0", "1-31"]),
        ("0 2 32 * *", ["day-of-month", "32"]),
        ("0 2 * 13 *", ["month", "13", "1-12"]),
        ("0 2 * * 8", ["day-of-week", "8", "0-7"]),
        ("0 2 * foo *", ["month", "'foo'"]),
        ("0 2 * * monday", ["day-of-week", "'monday'"]),
        ("0 2 * * jan", ["day-of-week", "'jan'"]),
        ("x 2 * * *", ["minute", "'x'"]),
        ("*/0 * * * *", ["minute", "step"]),
        ("*/61 * * * *", ["minute", "step 61"]),
        ("5/10 * * * *", ["minute", "5-59/10"]),
        ("0 5-2 * * *", ["hour", "backwards"]),
        ("0 2- * * *", ["hour", "without an end"]),
        ("0 1,,2 * * *", ["hour", "empty"]),
        ("-1 2 * * *", ["minute"]),
        ("@dayly", ["@dayly", "@daily"]),
    ],
)
def test_invalid_cron_expressions_name_the_field(expr, words):
    with pytest.raises(sched.CronError) as err:
        sched.validate_cron(expr)
    for word in words:
        assert word in str(err.value)


def test_cli_rejects_a_bad_cron_with_exit_2_and_no_traceback(job, crontab):
    res = CliRunner().invoke(cli, ["schedule", str(job), "--cron", "0 25 * * *"])
    assert res.exit_code == 2
    assert "hour" in res.output and "25" in res.output
    assert "Traceback" not in res.output
    assert not crontab.exists()


# -- the line ------------------------------------------------------------------------------------


def test_line_uses_absolute_paths_flock_log_and_a_stable_marker(job, crontab, tmp_path, monkeypatch):
    cfg_output = tmp_path / "out" / "caption"
    entry = sched.build_entry("jobs/caption.yaml", "0 2 * * *", cfg_output)
    assert entry.line.startswith("0 2 * * * cd ")
    assert entry.job == job.resolve() and entry.id == sched.entry_id(job)
    words = shlex.split(entry.command.split(" >> ")[0].split(" && ")[2])
    assert os.path.isabs(words[0]) and Path(words[0]).name == "flock"
    assert words[1:5] == ["-n", "-E", "75", str(cfg_output / ".cogbatch" / "cron.lock")]
    assert words[5:] == [*sched.cogbatch_executable(), "run", str(job.resolve()), "--quiet", "--json"]
    assert os.path.isabs(words[5])
    assert entry.command.startswith(f"cd {shlex.quote(str(tmp_path.resolve()))} && ")
    assert entry.command.endswith(f">> {cfg_output / 'cogbatch.log'} 2>&1")
    assert sched.marker_of(entry.line) == (entry.id, str(job.resolve()))
    # the id is the same from any directory and for any spelling of the path
    monkeypatch.chdir(job.parent)
    assert sched.entry_id("caption.yaml") == entry.id == sched.entry_id(job.parent / ".." / "jobs" / "caption.yaml")


def test_percent_signs_are_escaped_for_cron(crontab, tmp_path):
    entry = sched.build_entry(tmp_path / "100%.yaml", "@daily", tmp_path / "o%ut")
    assert "%" not in entry.line.replace(r"\%", "")
    assert "o%ut" in entry.command
    assert sched.marker_of(entry.line)[1].endswith("100%.yaml")


def test_cogbatch_executable_is_this_environment():
    exe = sched.cogbatch_executable()
    assert os.path.isabs(exe[0])
    assert exe[-1].endswith("cogbatch")  # bin/cogbatch beside sys.executable, or `python -m cogbatch`
    if len(exe) == 1:
        assert Path(exe[0]).parent == Path(os.path.abspath(sys.executable)).parent or shutil.which("cogbatch")


def test_missing_crontab_or_flock_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(sched.ScheduleError, match="install cron"):
        sched.read_crontab()
    with pytest.raises(sched.ScheduleError, match="util-linux"):
        sched.build_entry(tmp_path / "job.yaml", "@daily", tmp_path / "out")


def test_cli_missing_crontab_is_a_clean_error(job, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = CliRunner().invoke(cli, ["schedule", "--list"])
    assert res.exit_code == 1
    assert "crontab" in res.output and "install cron" in res.output
    assert "Traceback" not in res.output


# -- the crontab round trip ----------------------------------------------------------------------


def test_install_reinstall_change_remove_list_round_trip(job, crontab, tmp_path):
    user_lines = ["# my own jobs", "MAILTO=me@example.org", "*/5 * * * * /usr/bin/true"]
    crontab.write_text("\n".join(user_lines) + "\n")
    out = tmp_path / "out" / "caption"

    entry = sched.build_entry(job, "0 2 * * *", out)
    assert sched.install(entry) == "added"
    assert crontab.read_text() == "\n".join([*user_lines, entry.line]) + "\n"

    assert sched.install(entry) == "unchanged"  # running twice leaves one line
    assert crontab.read_text().count("# cogbatch:") == 1

    changed = sched.build_entry(job, "30 3 * * 1-5", out)
    assert sched.install(changed) == "replaced"
    assert crontab.read_text() == "\n".join([*user_lines, changed.line]) + "\n"

    other_job = job.with_name("vqa.yaml")
    other_job.write_text(job.read_text())
    other = sched.build_entry(other_job, "@hourly", tmp_path / "out" / "vqa")
    assert sched.install(other) == "added"
    listed = sched.list_entries()
    assert [(e["id"], e["cron"], e["job"]) for e in listed] == [
        (changed.id, "30 3 * * 1-5", str(job.resolve())),
        (other.id, "@hourly", str(other_job.resolve())),
    ]
    assert [e["id"] for e in sched.list_entries(other_job)] == [other.id]

    assert sched.remove(job) == 1
    assert crontab.read_text() == "\n".join([*user_lines, other.line]) + "\n"
    assert sched.remove(job) == 0
    assert sched.remove(other_job) == 1
    assert crontab.read_text() == "\n".join(user_lines) + "\n"
    assert sched.list_entries() == []


def test_install_into_an_empty_crontab_and_collapse_duplicates(job, crontab, tmp_path):
    entry = sched.build_entry(job, "@daily", tmp_path / "out")
    assert not crontab.exists()  # `crontab -l` says "no crontab for": an empty table
    assert sched.list_entries() == []
    assert sched.install(entry) == "added"
    assert crontab.read_text() == entry.line + "\n"
    crontab.write_text(f"{entry.line}\n0 1 * * * /bin/true\n{entry.line}\n")  # pasted twice by hand
    newer = sched.build_entry(job, "0 4 * * *", tmp_path / "out")
    assert sched.install(newer) == "replaced"
    assert crontab.read_text() == f"{newer.line}\n0 1 * * * /bin/true\n"


def test_crontab_failure_is_reported(job, crontab, tmp_path):
    broken = crontab.parent / "fakebin" / "crontab"
    _executable(broken, "#!/bin/sh\necho 'crontab: you are not allowed to use this program' >&2\nexit 1\n")
    with pytest.raises(sched.ScheduleError, match="not allowed"):
        sched.read_crontab()


def test_cli_round_trip(job, crontab):
    runner = CliRunner()
    printed = runner.invoke(cli, ["schedule", str(job), "--cron", "0 2 * * *"])
    assert printed.exit_code == 0, printed.output
    assert not crontab.exists()  # printing installs nothing
    line = printed.stdout.strip()
    assert line.startswith("0 2 * * * ") and "# cogbatch:" in line

    for _ in range(2):
        res = runner.invoke(cli, ["schedule", str(job), "--cron", "0 2 * * *", "--install"])
        assert res.exit_code == 0, res.output
    assert crontab.read_text() == line + "\n"

    res = runner.invoke(cli, ["schedule", str(job), "--cron", "15 1 * * *", "--install"])
    assert res.exit_code == 0 and "replaced" in res.output
    assert crontab.read_text().startswith("15 1 * * * ") and crontab.read_text().count("\n") == 1

    listed = runner.invoke(cli, ["schedule", "--list"])
    assert listed.exit_code == 0 and str(job.resolve()) in listed.stdout and "15 1 * * *" in listed.stdout

    removed = runner.invoke(cli, ["schedule", str(job), "--remove"])
    assert removed.exit_code == 0 and "removed 1" in removed.output
    assert crontab.read_text() == ""
    assert "nothing removed" in runner.invoke(cli, ["schedule", str(job), "--remove"]).output


@pytest.mark.parametrize(
    "args, message",
    [
        (["schedule", "--cron", "@daily"], "JOB is required"),
        (["schedule", "JOB"], "--cron EXPR is required"),
        (["schedule", "JOB", "--install"], "--cron EXPR is required"),
        (["schedule", "JOB", "--remove", "--cron", "@daily"], "no meaning with --remove"),
    ],
)
def test_cli_usage_errors(job, crontab, args, message):
    res = CliRunner().invoke(cli, [str(job) if a == "JOB" else a for a in args])
    assert res.exit_code == 2
    assert message in res.output


def test_cli_bad_job_fails_before_touching_the_crontab(tmp_path, crontab, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ninput: {folder: nowhere}\noutput: out\ntasks: [{name: c, prompt: p}]\n")
    res = CliRunner().invoke(cli, ["schedule", str(bad), "--cron", "@daily", "--install"])
    assert res.exit_code == 2 and "input.folder" in res.output
    assert not crontab.exists()

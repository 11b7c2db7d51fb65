"""`cogbatch.schedule`: cron validation, the crontab line, install / re-install / change / remove / list.

The crontab is always a fake `crontab` executable first on PATH that keeps the table in a file, so no
test can touch the real one; HOME is a temp dir too.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import shlex
import shutil
import stat
import subprocess
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
        ("0 ² * * *", ["hour", "'²'"]),  # str.isdigit() says yes, int() then raises
        ("７ 2 * * *", ["minute", "'７'"]),  # a full-width digit: int() takes it, cron does not
        ("*/５ * * * *", ["minute", "step"]),
        ("0 2 * * 1-５", ["day-of-week", "'５'"]),
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


@pytest.mark.parametrize("expr", ["0 ² * * *", "７ 2 * * *"])
def test_cli_rejects_non_ascii_digits(job, crontab, expr):
    res = CliRunner().invoke(cli, ["schedule", str(job), "--cron", expr, "--install"])
    assert res.exit_code == 2 and "--cron" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
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


EVIL = "nl\n* * * * * touch PWNED"


@pytest.mark.parametrize("where", ["cwd", "job", "output", "pipeline", "executable"])
def test_a_path_with_a_line_break_is_refused(crontab, tmp_path, monkeypatch, where):
    """A newline in any path of the line would make cron read a second, unquoted entry."""
    evil = tmp_path / EVIL
    evil.mkdir()
    kw = {"cwd": evil if where == "cwd" else tmp_path}
    if where == "pipeline":
        kw["pipeline"] = evil / "pipeline.yaml"
    if where == "executable":
        monkeypatch.setattr(sched, "cogbatch_executable", lambda: [str(evil / "bin" / "cogbatch")])
    job = evil / "job.yaml" if where == "job" else tmp_path / "job.yaml"
    output = evil / "out" if where == "output" else tmp_path / "out"
    with pytest.raises(sched.UnsafePathError) as err:
        sched.build_entry(job, "@daily", output, **kw)
    assert isinstance(err.value, sched.ScheduleError) and err.value.exit_code == 2
    assert "newline" in str(err.value) and "touch PWNED" in str(err.value)
    for other in ["\r", "\0"]:
        with pytest.raises(sched.UnsafePathError):
            sched.build_entry(tmp_path / f"a{other}b.yaml", "@daily", tmp_path / "out", cwd=tmp_path)
    assert not crontab.exists()


def test_cli_refuses_to_install_from_a_directory_with_a_newline(crontab, tmp_path, monkeypatch):
    evil = tmp_path / EVIL
    (evil / "images").mkdir(parents=True)
    (evil / "job.yaml").write_text(
        "model: tiny-random:cogvlm2\ninput: {folder: images}\noutput: out\ntasks: [{name: c, prompt: p}]\n"
    )
    monkeypatch.chdir(evil)
    res = CliRunner().invoke(cli, ["schedule", "job.yaml", "--cron", "@daily", "--install"])
    assert res.exit_code == 2 and "newline" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # no traceback
    assert not crontab.exists()
    assert not list(tmp_path.rglob("PWNED"))


def _old_style_line(cwd: str, job: Path, out: Path) -> str:
    """The line an older cogbatch wrote from a directory named `cwd` (newlines not refused then)."""
    q = shlex.quote
    command = (
        f"cd {q(cwd)} && mkdir -p {q(str(out / '.cogbatch'))} && /usr/bin/flock -n -E 75 "
        f"{q(str(out / '.cogbatch' / 'cron.lock'))} /venv/bin/cogbatch run {q(str(job))} --quiet --json "
        f">> {q(str(out / 'cogbatch.log'))} 2>&1"
    )
    return f"0 2 * * * {command} # cogbatch:{sched.entry_id(job)} job={str(job).replace(chr(10), ' ')}"


@pytest.mark.parametrize("cwd", ["/tmp/" + EVIL, "/tmp/a\nb\nc d's\n0 1 * * * x"])
def test_remove_and_install_take_out_every_line_of_a_broken_entry(job, crontab, tmp_path, cwd):
    user_before = ["MAILTO=me@example.org", "0 3 * * * cd /srv && ./backup.sh"]
    user_after = ["*/5 * * * * /usr/bin/true"]
    broken = _old_style_line(cwd, job.resolve(), tmp_path / "out").split("\n")
    assert len(broken) > 1  # what cron saw: several entries, one of them `* * * * * touch PWNED...`
    crontab.write_text("\n".join([*user_before, *broken, *user_after]) + "\n")

    listed = sched.list_entries()
    assert [(e["id"], e["cron"]) for e in listed] == [(sched.entry_id(job), "0 2 * * *")]
    assert listed[0]["line"].split("\n") == broken
    assert sched.remove(job) == 1
    assert crontab.read_text() == "\n".join([*user_before, *user_after]) + "\n"

    crontab.write_text("\n".join([*user_before, *broken, *user_after]) + "\n")
    entry = sched.build_entry(job, "0 2 * * *", tmp_path / "out")
    assert sched.install(entry) == "replaced"
    assert crontab.read_text() == "\n".join([*user_before, entry.line, *user_after]) + "\n"


def test_an_entry_with_quotes_and_percent_is_one_whole_line(crontab, tmp_path):
    """The broken-entry search never reaches up into the user's lines for an entry written now."""
    odd = tmp_path / 'it\'s 100% "odd" $HOME'
    odd.mkdir()
    user = ["0 1 * * * cd '/srv", "0 1 * * * echo $(date +\\%F)' # an unclosed quote of the user's own"]
    crontab.write_text("\n".join(user) + "\n")
    entry = sched.build_entry(odd / "job.yaml", "0 2 * * *", odd / "out", cwd=odd)
    assert sched.install(entry) == "added"
    assert sched.install(entry) == "unchanged"
    assert [e["line"] for e in sched.list_entries()] == [entry.line]
    assert sched.remove(odd / "job.yaml") == 1
    assert crontab.read_text() == "\n".join(user) + "\n"


def test_other_lines_are_kept_byte_for_byte(job, crontab, tmp_path):
    """Only "\n" ends a crontab line: a user's \r, form feed or U+2028, or a Latin-1 byte, survive."""
    user = "# caf\xe9 \r\n0 1 * * * echo 'a\x0cb\u2028c'\n".encode("utf-8").replace(b"\xc3\xa9", b"\xe9")
    crontab.write_bytes(user)
    entry = sched.build_entry(job, "@daily", tmp_path / "out")
    assert sched.install(entry) == "added"
    assert crontab.read_bytes() == user + entry.line.encode() + b"\n"
    assert sched.remove(job) == 1
    assert crontab.read_bytes() == user


def test_install_reports_re_enabling_a_commented_out_entry(job, crontab, tmp_path):
    entry = sched.build_entry(job, "0 2 * * *", tmp_path / "out")
    crontab.write_text(f"# {entry.line}\n0 1 * * * /bin/true\n")  # the user paused the job
    assert sched.list_entries()[0]["enabled"] is False
    assert sched.install(entry) == "re-enabled"
    assert crontab.read_text() == f"{entry.line}\n0 1 * * * /bin/true\n"
    assert sched.install(entry) == "unchanged"

    crontab.write_text(f"#{entry.line}\n")
    res = CliRunner().invoke(cli, ["schedule", str(job), "--cron", "0 2 * * *", "--install"])
    assert res.exit_code == 0 and "re-enabled" in res.output
    assert crontab.read_text().count("# cogbatch:") == 1 and not crontab.read_text().startswith("#")


# -- a night refused with 75 --------------------------------------------------------------------


def _log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("code", [75, 3, 0])
def test_refused_night_appends_a_json_note_and_keeps_exit_75(crontab, tmp_path, monkeypatch, code):
    fake = crontab.parent / "fakebin"
    _executable(fake / "flock", f"#!/bin/sh\nexit {code}\n")  # `flock -n -E 75 LOCK CMD`, CMD never run
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    entry = sched.build_entry(tmp_path / "job.yaml", "@daily", tmp_path / "out", cwd=tmp_path)
    res = subprocess.run(["sh", "-c", entry.command], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == code, res.stderr
    lines = _log_lines(entry.log)
    if code != 75:
        assert lines == []
        return
    assert len(lines) == 1
    note = json.loads(lines[0])
    assert note["event"] == "skipped" and note["exit_code"] == 75 and "lock" in note["reason"]
    assert dt.datetime.strptime(note["time"], "%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs util-linux flock")
def test_real_flock_refusal_is_logged(crontab, tmp_path):
    entry = sched.build_entry(tmp_path / "job.yaml", "@daily", tmp_path / "out", cwd=tmp_path)
    entry.lock.parent.mkdir(parents=True)
    with open(entry.lock, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # last night's run still going
        res = subprocess.run(["sh", "-c", entry.command], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 75, res.stderr
    assert [json.loads(line)["event"] for line in _log_lines(entry.log)] == ["skipped"]


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
        (["schedule", "JOB", "--list", "--remove"], "--remove and --list cannot be combined"),
        (["schedule", "JOB", "--install", "--remove", "--cron", "@daily"], "--install and --remove cannot be"),
    ],
)
def test_cli_usage_errors(job, crontab, args, message):
    res = CliRunner().invoke(cli, [str(job) if a == "JOB" else a for a in args])
    assert res.exit_code == 2
    assert message in res.output


def test_list_and_remove_together_leave_the_entry_alone(job, crontab):
    runner = CliRunner()
    assert runner.invoke(cli, ["schedule", str(job), "--cron", "0 2 * * *", "--install"]).exit_code == 0
    installed = crontab.read_text()
    res = runner.invoke(cli, ["schedule", str(job), "--list", "--remove"])
    assert res.exit_code == 2 and crontab.read_text() == installed


def test_cli_bad_job_fails_before_touching_the_crontab(tmp_path, crontab, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: test/x\ninput: {folder: nowhere}\noutput: out\ntasks: [{name: c, prompt: p}]\n")
    res = CliRunner().invoke(cli, ["schedule", str(bad), "--cron", "@daily", "--install"])
    assert res.exit_code == 2 and "input.folder" in res.output
    assert not crontab.exists()

"""Nightly runs: the crontab line for a job, and installing / removing / listing it in the user's crontab.

A scheduled job is one crontab line:

    0 2 * * * cd /where/you/were && mkdir -p OUT/.cogbatch && /usr/bin/flock -n -E 75 OUT/.cogbatch/cron.lock
        /venv/bin/cogbatch run /abs/job.yaml --quiet --json >> OUT/cogbatch.log 2>&1 # cogbatch:1a2b3c4d5e6f job=…

(one line in the crontab; wrapped here)

- `cd` into the directory `cogbatch schedule` ran in, because relative paths in a job (input folder,
  output) resolve against the current directory, and cron starts commands in $HOME.
- Absolute paths to the same Python environment's `cogbatch` and to the job, because cron's PATH is
  minimal and knows no virtualenv.
- `flock -n` on `OUT/.cogbatch/cron.lock` keeps a slow night from stacking a second Python process on
  the first. It is a different file from the run lock (`OUT/.cogbatch/run.lock`, see `cogbatch.lock`):
  flock(1) holds its lock for the whole command, so the run would find its own lock taken.
- The trailing comment is the marker that identifies cogbatch's entry: its id is derived from the
  absolute job path, so installing again replaces the line instead of adding one, and `--remove`
  needs nothing but the job path (the job file may already be gone).

The crontab is read with `crontab -l` and written with `crontab -` only; every other line of it is
kept byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "# cogbatch:"
_MARKER_RE = re.compile(r"\s#\scogbatch:(?P<id>[0-9a-f]{12})(?:\sjob=(?P<job>.*))?$")
LOG_NAME = "cogbatch.log"
CRON_LOCK = Path(".cogbatch") / "cron.lock"
LOCKED_EXIT = 75  # EX_TEMPFAIL: "try again later", what a run that finds the job running exits with

SPECIAL = ("@reboot", "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, low, high, names mapped to numbers)
_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {n: i + 1 for i, n in enumerate(_MONTHS)}),
    ("day-of-week", 0, 7, {n: i for i, n in enumerate(_DAYS)}),  # 0 and 7 are both Sunday
)


class CronError(ValueError):
    """An invalid cron expression; the message names the field."""


class ScheduleError(Exception):
    """crontab or flock is missing or failed; the message says what to install or what went wrong."""


# -- cron expressions ----------------------------------------------------------------------------


def validate_cron(expr: str) -> str:
    """The expression normalised to single spaces; raises CronError naming the bad field.

    Checked here rather than left to `crontab -`, which rejects the whole table with a message about a
    line number in a temp file, or (some crons) accepts a typo and never runs it.
    """
    fields = expr.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        word = fields[0].lower()
        if word not in SPECIAL:
            raise CronError(f"unknown cron shortcut {fields[0]!r} (known: {', '.join(SPECIAL)})")
        return word
    if len(fields) != 5:
        names = " ".join(name for name, *_ in _FIELDS)
        raise CronError(
            f"a cron expression has 5 fields ({names}) or is one of {', '.join(SPECIAL)}; "
            f"got {len(fields)} field{'s' if len(fields) != 1 else ''} in {expr!r}"
        )
    for value, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        _check_field(value, name, low, high, names)
    return " ".join(fields)


def _check_field(value: str, name: str, low: int, high: int, names: dict[str, int]) -> None:
    def bad(why: str) -> CronError:
        return CronError(f"cron {name} field {value!r}: {why}")

    def number(token: str) -> int:
        if token.lower() in names:
            return names[token.lower()]
        if not token.isdigit():
            allowed = f"a number {low}-{high}" + (f" or a name ({', '.join(names)})" if names else "")
            raise bad(f"{token!r} is not {allowed}")
        n = int(token)
        if not low <= n <= high:
            raise bad(f"{n} is out of range {low}-{high}")
        return n

    for item in value.split(","):
        if not item:
            raise bad("empty list item")
        base, slash, step = item.partition("/")
        if slash:
            if not step.isdigit() or int(step) < 1:
                raise bad(f"step {step!r} must be a positive number")
            if int(step) > high - low + 1:
                raise bad(f"step {step} is larger than the range {low}-{high}")
            if base != "*" and "-" not in base:
                raise bad(f"a step needs * or a range before it (write {base}-{high}/{step})")
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        if not start:
            raise bad("empty value")
        first = number(start)
        if dash:
            last = number(end) if end else None
            if last is None:
                raise bad("range without an end")
            if first > last:
                raise bad(f"range {base} runs backwards")


# -- the line ------------------------------------------------------------------------------------


def entry_id(job: str | os.PathLike[str]) -> str:
    """Stable id of a job's crontab entry: derived from the absolute job path, so any cwd finds it."""
    return hashlib.sha256(str(Path(job).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:12]


def cogbatch_executable() -> list[str]:
    """Absolute command for this same environment's cogbatch (cron knows no virtualenv)."""
    beside = Path(os.path.abspath(sys.executable)).parent / "cogbatch"  # not resolve(): keep the venv's bin
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("cogbatch")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "cogbatch"]


def require(tool: str) -> str:
    """Absolute path of `flock` or `crontab`, or a ScheduleError saying which package provides it."""
    found = shutil.which(tool)
    if found:
        return os.path.abspath(found)
    package = {
        "flock": "util-linux (Debian/Ubuntu: apt-get install util-linux; Fedora: dnf install util-linux)",
        "crontab": "cron (Debian/Ubuntu: apt-get install cron; Fedora/RHEL: dnf install cronie)",
    }[tool]
    raise ScheduleError(f"`{tool}` was not found on PATH: install {package}")


@dataclass(frozen=True)
class CronEntry:
    id: str
    cron: str
    job: Path
    output: Path
    command: str  # what cron hands to /bin/sh (also runnable by hand with `sh -c`)
    line: str  # the crontab line: schedule, command with % escaped, marker
    log: Path
    lock: Path

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


def _cron_escape(text: str) -> str:
    """cron turns an unescaped % into a newline (the rest becomes stdin): escape it."""
    return text.replace("%", r"\%")


def build_entry(
    job: str | os.PathLike[str],
    cron: str,
    output: Path,
    *,
    output_override: bool = False,
    pipeline: str | os.PathLike[str] | None = None,
    cwd: Path | None = None,
) -> CronEntry:
    """The crontab entry that runs `job` on `cron`, flock-guarded, logging under `output`.

    `output` is the job's resolved (absolute) output directory; it is passed to the run only when the
    user overrode it (`output_override`), so a later edit of the job's `output:` key still applies.
    """
    cron = validate_cron(cron)
    job_path = Path(job).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    output = Path(os.path.abspath(output))
    flock = require("flock")
    lock = output / CRON_LOCK
    log = output / LOG_NAME
    run = [*cogbatch_executable(), "run", str(job_path)]
    if output_override:
        run += ["--output", str(output)]
    if pipeline is not None:
        run += ["--pipeline", str(Path(pipeline).resolve())]
    run += ["--quiet", "--json"]
    q = shlex.quote
    command = (
        f"cd {q(str(cwd))} && mkdir -p {q(str(lock.parent))} && "
        f"{q(flock)} -n -E {LOCKED_EXIT} {q(str(lock))} {shlex.join(run)} >> {q(str(log))} 2>&1"
    )
    ident = entry_id(job_path)
    job_label = str(job_path).replace("\n", " ")
    line = f"{cron} {_cron_escape(command)} {MARKER}{ident} job={_cron_escape(job_label)}"
    return CronEntry(ident, cron, job_path, output, command, line, log, lock)


# -- the crontab ---------------------------------------------------------------------------------


def read_crontab() -> list[str]:
    """The user's crontab as lines (no trailing newlines); [] when the user has none yet."""
    crontab = require("crontab")
    res = subprocess.run([crontab, "-l"], capture_output=True, text=True)
    if res.returncode != 0:
        if "no crontab for" in res.stderr.lower():
            return []
        raise ScheduleError(f"`crontab -l` failed (exit {res.returncode}): {res.stderr.strip() or 'no message'}")
    return res.stdout.splitlines()


def write_crontab(lines: list[str]) -> None:
    """Replace the user's crontab (cron wants a newline after the last line)."""
    crontab = require("crontab")
    text = "".join(line + "\n" for line in lines)
    res = subprocess.run([crontab, "-"], input=text, capture_output=True, text=True)
    if res.returncode != 0:
        raise ScheduleError(f"`crontab -` refused the new table (exit {res.returncode}): {res.stderr.strip()}")


def marker_of(line: str) -> tuple[str, str | None] | None:
    """(entry id, job path) when `line` is a cogbatch entry, else None. Commented-out lines count too."""
    m = _MARKER_RE.search(line)
    if not m:
        return None
    job = m["job"].replace(r"\%", "%") if m["job"] is not None else None
    return m["id"], job


def install(entry: CronEntry) -> str:
    """Add or replace the job's line; returns "added", "replaced" or "unchanged".

    Replaced in place (where the old line was), so a user's ordering and comments around it stay.
    Several lines with this job's id (someone pasted it twice) collapse into one.
    """
    lines = read_crontab()
    positions = [i for i, line in enumerate(lines) if (marker_of(line) or ("",))[0] == entry.id]
    if len(positions) == 1 and lines[positions[0]] == entry.line:
        return "unchanged"
    if not positions:
        write_crontab([*lines, entry.line])
        return "added"
    first = positions[0]
    kept = [line for i, line in enumerate(lines) if i not in positions[1:]]
    kept[first] = entry.line
    write_crontab(kept)
    return "replaced"


def remove(job: str | os.PathLike[str]) -> int:
    """Remove the job's line(s); returns how many were removed (0: there was none, nothing written)."""
    ident = entry_id(job)
    lines = read_crontab()
    kept = [line for line in lines if (marker_of(line) or ("",))[0] != ident]
    if len(kept) != len(lines):
        write_crontab(kept)
    return len(lines) - len(kept)


def list_entries(job: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """cogbatch's entries in the crontab (only `job`'s when given): id, schedule, job, line."""
    wanted = entry_id(job) if job is not None else None
    out = []
    for line in read_crontab():
        found = marker_of(line)
        if found is None or (wanted is not None and found[0] != wanted):
            continue
        stripped = line.lstrip()
        enabled = not stripped.startswith("#")
        fields = stripped.lstrip("#").split()
        schedule = fields[0] if fields and fields[0].startswith("@") else " ".join(fields[:5])
        out.append({"id": found[0], "cron": schedule, "job": found[1], "enabled": enabled, "line": line})
    return out


def format_entries(entries: list[dict[str, Any]]) -> str:
    """`--list` output: id, schedule, job path, one entry a line."""
    return "\n".join(
        f"{e['id']}  {e['cron']:<15} {e['job']}" + ("" if e["enabled"] else "  (commented out)") for e in entries
    )

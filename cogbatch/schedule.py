"""Nightly runs: the crontab line for a job, and installing / removing / listing it in the user's crontab.

A scheduled job is one crontab line:

    0 2 * * * cd /where/you/were && mkdir -p OUT/.cogbatch && /usr/bin/flock -n -E 75 OUT/.cogbatch/cron.lock
        /venv/bin/cogbatch run /abs/job.yaml --quiet --json >> OUT/cogbatch.log 2>&1
        || { rc=$?; [ "$rc" -ne 75 ] || echo '{"event": "skipped", …}'; exit "$rc"; } >> OUT/cogbatch.log 2>&1
        # cogbatch:1a2b3c4d5e6f job=…

(one line in the crontab; wrapped here)

- `cd` into the directory `cogbatch schedule` ran in, because relative paths in a job (input folder,
  output) resolve against the current directory, and cron starts commands in $HOME.
- Absolute paths to the same Python environment's `cogbatch` and to the job, because cron's PATH is
  minimal and knows no virtualenv.
- `flock -n` on `OUT/.cogbatch/cron.lock` keeps a slow night from stacking a second Python process on
  the first. It is a different file from the run lock (`OUT/.cogbatch/run.lock`, see `cogbatch.lock`):
  flock(1) holds its lock for the whole command, so the run would find its own lock taken.
- A night refused with 75 (by flock, or by the run finding another run's lock) appends one JSON line
  to the log and still exits 75: without it the log would say nothing about a night that did nothing.
- Paths are quoted for sh, but no quoting survives a line break: cron reads one entry per line, so a
  directory named `x<newline>* * * * * evil` would become a second entry. Such paths are refused.
- The trailing comment is the marker that identifies cogbatch's entry: its id is derived from the
  absolute job path, so installing again replaces the line instead of adding one, and `--remove`
  needs nothing but the job path (the job file may already be gone).

The crontab is read with `crontab -l` and written with `crontab -` only; every other line of it is
kept byte for byte (split on newlines only, undecodable bytes kept as they were).
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

from cogbatch.errors import EXIT_LOCKED, CronError, ScheduleError, UnsafePathError

MARKER = "# cogbatch:"
_DIGITS = re.compile("[0-9]+")  # not str.isdigit(): it accepts "²" (int() then fails) and "７" (cron does not)
_MARKER_RE = re.compile(r"\s#\scogbatch:(?P<id>[0-9a-f]{12})(?:\sjob=(?P<job>.*))?$")
LOG_NAME = "cogbatch.log"
CRON_LOCK = Path(".cogbatch") / "cron.lock"

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
        if not _DIGITS.fullmatch(token):
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
            if not _DIGITS.fullmatch(step) or int(step) < 1:
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


_LINE_BREAKS = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte"}


def check_path(what: str, path: str | os.PathLike[str]) -> None:
    """Raise UnsafePathError when `path` holds a character that would split or cut the crontab line.

    Quoting protects a path from sh, not from cron: cron reads one entry per line before sh sees it, so
    a directory named `nl<newline>* * * * * touch PWNED` would install a second, unquoted entry.
    """
    text = os.fspath(path)
    found = [name for char, name in _LINE_BREAKS.items() if char in text]
    if found:
        raise UnsafePathError(
            f"cannot schedule: the {what} {text!r} contains {' and '.join(found)}, which would split the "
            "crontab line into separate entries; rename it (or run `cogbatch schedule` from another directory)"
        )


def _locked_note(log: Path) -> str:
    """sh that appends one JSON line to the log when the night was refused with 75, keeping that exit code.

    75 comes from `flock -n -E 75` (last night's run still going) or from the run itself (another run of
    the output holds its lock): either way nothing ran, and without a note the log would not say so.
    """
    note = (
        '{"event": "skipped", "exit_code": 75, "time": "\'"$(date -u +%Y-%m-%dT%H:%M:%SZ)"\'", '
        '"reason": "another run of this job still holds its lock"}'
    )
    return f'{{ rc=$?; [ "$rc" -ne {EXIT_LOCKED} ] || echo \'{note}\'; exit "$rc"; }} >> {shlex.quote(str(log))} 2>&1'


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
    Raises UnsafePathError when any path of the line holds a line break (see `check_path`).
    """
    cron = validate_cron(cron)
    check_path("job path", job)  # before resolve(), which raises ValueError on a NUL
    if pipeline is not None:
        check_path("pipeline path", pipeline)
    job_path = Path(job).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    output = Path(os.path.abspath(output))
    pipeline_path = Path(pipeline).resolve() if pipeline is not None else None
    for what, path in [("working directory", cwd), ("job path", job_path), ("output directory", output)]:
        check_path(what, path)
    if pipeline_path is not None:
        check_path("pipeline path", pipeline_path)
    flock = require("flock")
    exe = cogbatch_executable()
    for path in [flock, *exe[:1]]:
        check_path("executable path", path)
    lock = output / CRON_LOCK
    log = output / LOG_NAME
    run = [*exe, "run", str(job_path)]
    if output_override:
        run += ["--output", str(output)]
    if pipeline_path is not None:
        run += ["--pipeline", str(pipeline_path)]
    run += ["--quiet", "--json"]
    q = shlex.quote
    command = (
        f"cd {q(str(cwd))} && mkdir -p {q(str(lock.parent))} && "
        f"{q(flock)} -n -E {EXIT_LOCKED} {q(str(lock))} {shlex.join(run)} >> {q(str(log))} 2>&1 "
        f"|| {_locked_note(log)}"
    )
    ident = entry_id(job_path)
    line = f"{cron} {_cron_escape(command)} {MARKER}{ident} job={_cron_escape(str(job_path))}"
    return CronEntry(ident, cron, job_path, output, command, line, log, lock)


# -- the crontab ---------------------------------------------------------------------------------


def read_crontab() -> list[str]:
    """The user's crontab as lines (no trailing newlines); [] when the user has none yet.

    Bytes, split on "\n" only: text mode would turn a "\r" into a line break and str.splitlines() splits
    on form feeds and U+2028 too, so a user's line holding one would be rewritten. Bytes that are not
    UTF-8 survive the round trip through surrogateescape.
    """
    crontab = require("crontab")
    res = subprocess.run([crontab, "-l"], capture_output=True)
    if res.returncode != 0:
        stderr = res.stderr.decode("utf-8", "replace")
        if "no crontab for" in stderr.lower():
            return []
        raise ScheduleError(f"`crontab -l` failed (exit {res.returncode}): {stderr.strip() or 'no message'}")
    text = res.stdout.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def write_crontab(lines: list[str]) -> None:
    """Replace the user's crontab (cron wants a newline after the last line)."""
    crontab = require("crontab")
    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
    res = subprocess.run([crontab, "-"], input=data, capture_output=True)
    if res.returncode != 0:
        stderr = res.stderr.decode("utf-8", "replace").strip()
        raise ScheduleError(f"`crontab -` refused the new table (exit {res.returncode}): {stderr}")


def marker_of(line: str) -> tuple[str, str | None] | None:
    """(entry id, job path) when `line` is a cogbatch entry, else None. Commented-out lines count too."""
    m = _MARKER_RE.search(line)
    if not m:
        return None
    job = m["job"].replace(r"\%", "%") if m["job"] is not None else None
    return m["id"], job


@dataclass(frozen=True)
class _Span:
    """One cogbatch entry in the crontab: lines[first:last + 1], the marker on the last line."""

    first: int
    last: int
    id: str
    job: str | None

    @property
    def lines(self) -> range:
        return range(self.first, self.last + 1)


_MAX_FRAGMENTS = 64  # how far up a broken entry's lines are looked for


def _is_whole_entry(text: str) -> bool:
    """Whether `text` (marker included) is a complete cogbatch entry: a valid schedule, then `cd …` whose
    quotes all close. The last line of an entry that a path with a newline split (written before such
    paths were refused) starts inside a quoted path, so on its own it is not whole."""
    body = text[: _MARKER_RE.search(text).start()].lstrip(" \t#")
    n_schedule = 1 if body.startswith("@") else 5
    fields = body.split(None, n_schedule)
    if len(fields) <= n_schedule or not fields[n_schedule].startswith("cd "):
        return False
    try:
        validate_cron(" ".join(fields[:n_schedule]))
        shlex.split(fields[n_schedule])
    except ValueError:  # CronError, or shlex's "No closing quotation"
        return False
    return True


def _spans(lines: list[str]) -> list[_Span]:
    """cogbatch's entries, each with the lines it covers.

    An entry normally is one line. One written by an older cogbatch from a directory whose name holds a
    newline was split by cron into several lines (the earlier ones can be valid entries of their own):
    going up from the marker line until the joined lines form a whole entry finds them all, so
    `--remove` and `--install` take the whole of it out.
    """
    spans: list[_Span] = []
    floor = 0  # lines above this belong to an earlier entry
    for i, line in enumerate(lines):
        found = marker_of(line)
        if found is None:
            continue
        first = i
        if not _is_whole_entry(line):
            for j in range(i - 1, max(floor, i - _MAX_FRAGMENTS) - 1, -1):
                if _is_whole_entry("\n".join(lines[j : i + 1])):
                    first = j
                    break
        spans.append(_Span(first, i, *found))
        floor = i + 1
    return spans


def _commented(line: str) -> bool:
    return line.lstrip().startswith("#")


def install(entry: CronEntry) -> str:
    """Add or replace the job's line; returns "added", "replaced", "re-enabled" or "unchanged".

    Replaced in place (where the old line was), so a user's ordering and comments around it stay.
    Several lines with this job's id (someone pasted it twice) collapse into one. "re-enabled" says that
    every line found was commented out, so the user knows the job runs again from now on.
    """
    lines = read_crontab()
    mine = [span for span in _spans(lines) if span.id == entry.id]
    if len(mine) == 1 and mine[0].first == mine[0].last and lines[mine[0].first] == entry.line:
        return "unchanged"
    if not mine:
        write_crontab([*lines, entry.line])
        return "added"
    result = "re-enabled" if all(_commented(lines[span.first]) for span in mine) else "replaced"
    drop = {i for span in mine for i in span.lines}
    first = mine[0].first
    write_crontab([entry.line if i == first else line for i, line in enumerate(lines) if i == first or i not in drop])
    return result


def remove(job: str | os.PathLike[str]) -> int:
    """Remove the job's entries, with every line of a broken one; returns how many entries were removed
    (0: there was none, nothing written)."""
    ident = entry_id(job)
    lines = read_crontab()
    mine = [span for span in _spans(lines) if span.id == ident]
    if mine:
        drop = {i for span in mine for i in span.lines}
        write_crontab([line for i, line in enumerate(lines) if i not in drop])
    return len(mine)


def list_entries(job: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """cogbatch's entries in the crontab (only `job`'s when given): id, schedule, job, line."""
    wanted = entry_id(job) if job is not None else None
    lines = read_crontab()
    out = []
    for span in _spans(lines):
        if wanted is not None and span.id != wanted:
            continue
        first = lines[span.first]
        fields = first.lstrip().lstrip("#").split()
        schedule = fields[0] if fields and fields[0].startswith("@") else " ".join(fields[:5])
        line = "\n".join(lines[i] for i in span.lines)
        out.append({"id": span.id, "cron": schedule, "job": span.job, "enabled": not _commented(first), "line": line})
    return out


def format_entries(entries: list[dict[str, Any]]) -> str:
    """`--list` output: id, schedule, job path, one entry a line."""
    return "\n".join(
        f"{e['id']}  {e['cron']:<15} {e['job']}" + ("" if e["enabled"] else "  (commented out)") for e in entries
    )

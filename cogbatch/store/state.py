"""Where an output's run state lives: `<output>.cogbatch/`, beside the output, never inside it.

The output directory holds result parts only (`part-*.parquet`), so that every Parquet reader opens it as
it is: `polars.scan_parquet(dir)` walks the whole tree (hidden and `_`-prefixed folders too) and fails on
any file that is not Parquet, and DuckDB's `out/**/*.parquet` reads hidden folders. Everything else a run
needs sits in the sibling state directory:

    outputs/caption/                    part-<run id>-<seq>.parquet, nothing else
    outputs/caption.cogbatch/
      config.resolved.yaml              the settings of the last run, after every default
      runs.jsonl                        one line per run (`cogbatch status --history`)
      input.json                        the input the last run used (commands without --input follow it)
      hashes.parquet                    the input files' sha256, cached per (path, size, mtime)
      settings.json                     fingerprint -> the settings behind it
      run.lock, run.lock.json           one run per output (flock) and who holds it
      compact.lock, compact-journal.json  compaction's flock and its crash journal
      cron.lock, cogbatch.log           the scheduled run's flock(1) lock and its log
      ray/                              the Ray engine's notes of batches that killed their actor
      tmp/                              parts being written: fsynced there, then renamed into the output
      gallery/                          `cogbatch gallery`'s default page and thumbnails

Outputs written before this layout kept these files inside the output (`LEGACY`); `store.prepare` moves
them here on the next `run` or `compact`, and readers find them where they are until then (`readable`).
Cheap to import: no pyarrow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cogbatch.fsio import atomic_write

SUFFIX = ".cogbatch"

CONFIG = "config.resolved.yaml"
HISTORY = "runs.jsonl"
INPUT = "input.json"
HASHES = "hashes.parquet"
SETTINGS = "settings.json"
RUN_LOCK = "run.lock"
RUN_LOCK_INFO = "run.lock.json"
COMPACT_LOCK = "compact.lock"
JOURNAL = "compact-journal.json"
CRON_LOCK = "cron.lock"
CRON_LOG = "cogbatch.log"
RAY = "ray"
TMP = "tmp"
GALLERY = "gallery"

# Where the layout before the state directory kept each state file, relative to the output.
LEGACY = {
    CONFIG: "config.resolved.yaml",
    HISTORY: "runs.jsonl",
    CRON_LOG: "cogbatch.log",
    HASHES: ".cogbatch/hashes.parquet",
    SETTINGS: ".cogbatch/settings.json",
    RUN_LOCK: ".cogbatch/run.lock",
    RUN_LOCK_INFO: ".cogbatch/run.lock.json",
    CRON_LOCK: ".cogbatch/cron.lock",
    RAY: ".cogbatch/ray",
    COMPACT_LOCK: ".compact.lock",
    JOURNAL: ".compact-journal.json",
}
LEGACY_DIR = ".cogbatch"


def state_dir(output: str | os.PathLike[str]) -> Path:
    """`<output>.cogbatch`: the one place that says where an output's state lives.

    Absolute (relative outputs resolve against the current directory) but symlinks are not followed, so the
    state sits where the user sees the output: `outputs/caption` -> `outputs/caption.cogbatch`.
    """
    out = Path(os.path.abspath(output))
    return out.with_name(out.name + SUFFIX)


def state_file(output: str | os.PathLike[str], name: str) -> Path:
    """Where `name` (one of the names above) is written."""
    return state_dir(output) / name


def legacy_file(output: str | os.PathLike[str], name: str) -> Path | None:
    """Where the old layout kept `name` inside the output, or None for files it did not have."""
    rel = LEGACY.get(name)
    return Path(output) / rel if rel is not None else None


def readable(output: str | os.PathLike[str], name: str) -> Path:
    """Where to read `name` from: the state directory, else an old layout's copy inside the output.

    `status`, `export` and `gallery` read an output of the old layout through this without moving anything.
    """
    new = state_file(output, name)
    if os.path.lexists(new):
        return new
    old = legacy_file(output, name)
    return old if old is not None and os.path.lexists(old) else new


def ensure_state_dir(output: str | os.PathLike[str]) -> Path:
    directory = state_dir(output)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def part_temp_dir(output: str | os.PathLike[str]) -> Path:
    """Where part files are written before their rename into the output: `<state>/tmp`.

    A rename is atomic only within one file system; the state directory is the output's sibling, so it is on
    the same one unless the output itself is a mount point. Then the temp files go into the output as before
    (`.tmp-*` names), which a reader may meet while a run writes.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = ensure_state_dir(out) / TMP
    tmp.mkdir(exist_ok=True)
    return tmp if same_file_system(tmp, out) else out


def same_file_system(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


# -- the recorded input --------------------------------------------------------------------------


def record_input(output: str | os.PathLike[str], location: Path, kind: str, run_id: str) -> None:
    """Note the input a run used (`kind`: folder or manifest), so that later commands without --input follow it."""
    data = {kind: str(location), "run_id": run_id}
    atomic_write(ensure_state_dir(output) / INPUT, json.dumps(data, indent=1))


def recorded_input(output: str | os.PathLike[str]) -> Path | None:
    """The folder or manifest the last run of `output` used, or None (no run recorded one, or an unreadable note)."""
    try:
        data: Any = json.loads(state_file(output, INPUT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    location = data.get("folder") or data.get("manifest")
    return Path(location) if isinstance(location, str) and location else None

"""An output of the layout before `<output>.cogbatch/`: read as it is, then migrated by the next run.

The old layout is rebuilt by hand, file by file, where the old code wrote each file: the run's state
inside the output (config.resolved.yaml, runs.jsonl, cogbatch.log, .cogbatch/{hashes.parquet,
settings.json, run.lock, cron.lock}, .compact.lock) and a dead writer's temp file, beside the parts of a
real run. `status` and `export` read it without moving anything; the next `run` moves the state out,
generates nothing and leaves every row as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from cogbatch.store import read_results
from cogbatch.store.state import state_dir
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of


def _to_old_layout(out: Path) -> dict[str, bytes]:
    """Put a run's state back where the old code kept it; returns the moved files' bytes by their old path."""
    state = state_dir(out)
    (out / ".cogbatch").mkdir()
    for name, old in (
        ("config.resolved.yaml", "config.resolved.yaml"),
        ("runs.jsonl", "runs.jsonl"),
        ("hashes.parquet", ".cogbatch/hashes.parquet"),
        ("settings.json", ".cogbatch/settings.json"),
    ):
        shutil.copyfile(state / name, out / old)  # fmt: skip
    shutil.rmtree(state)  # the old code had no state directory
    (out / "cogbatch.log").write_text('{"exit_code": 0, "done": 6}\n')
    for lock in (".cogbatch/run.lock", ".cogbatch/cron.lock", ".compact.lock"):
        (out / lock).touch()
    (out / f".tmp-part-20250101T000000Z-abcdef-00009.parquet.{'f' * 32}").write_bytes(b"a writer killed midway")
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and "part-" not in p.name}


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_an_old_layout_output_is_read_then_migrated_with_no_row_changed_and_nothing_generated(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)
    job = job_factory()
    assert cogbatch_cmd("run", str(job), "--quiet").returncode == 0
    out = tmp_path / "out"
    old = _to_old_layout(out)
    rows = read_results(out)
    assert rows.num_rows == 6
    before = _tree(out)

    status = cogbatch_cmd("status", str(job), "--json")
    assert status.returncode == 0, status.stderr
    assert {t["ok"] for t in json.loads(status.stdout)["tasks"].values()} == {3}  # its rows are found, none pending
    history = cogbatch_cmd("status", str(job), "--history", "--json")
    assert len(json.loads(history.stdout)) == 1  # the old runs.jsonl, where it is
    exported = cogbatch_cmd("export", str(job), "--format", "jsonl")
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 6
    assert _tree(out) == before and not state_dir(out).exists()  # read, nothing moved, nothing created

    ran = cogbatch_cmd("run", str(job), "--json", "--quiet")
    assert ran.returncode == 0, ran.stderr
    summary = summary_of(ran)
    assert (summary["pending"], summary["done"], summary["model_loaded"]) == (0, 0, False)  # nothing generated
    assert sorted(os.listdir(out)) == sorted(p for p in before if p.startswith("part-"))  # parts only, the same
    assert read_results(out).equals(rows)  # every row and text as it was, in the same order
    state = state_dir(out)
    for old_path, name in (("config.resolved.yaml", "config.resolved.yaml"), (".cogbatch/hashes.parquet",
                           "hashes.parquet"), (".cogbatch/settings.json", "settings.json")):  # fmt: skip
        assert (state / name).read_bytes() == old[old_path], name
    assert (state / "runs.jsonl").read_bytes().startswith(old["runs.jsonl"])  # the run appended its own line
    assert len((state / "runs.jsonl").read_text().splitlines()) == 2
    assert (state / "cogbatch.log").read_bytes() == old["cogbatch.log"]

    again = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))  # the migrated output resumes as any
    assert again["pending"] == 0 and read_results(out).equals(rows)

"""Commands that agree: after `run --input X`, `status`, `export` and `schedule` act on X; exit codes.

The job names one folder (3 images); the run is pointed at another (5 images) with --input. The
commands after it, given the same job and no --input, follow the input the run recorded and say so on
stderr in one line.
"""

from __future__ import annotations

import json
import os
import shlex

from cogbatch.store import read_results
from cogbatch.store.state import state_dir
from tests.e2e.conftest import cogbatch_cmd, make_images, summary_of

CAPTION = [{"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 3}]


def test_after_run_input_x_status_export_and_schedule_act_on_x(tmp_path, job_factory):
    make_images(tmp_path / "images", 3)  # the job's own folder
    pictures = make_images(tmp_path / "Pictures", 5, seed=7)
    job = job_factory(tasks=CAPTION)
    ran = summary_of(cogbatch_cmd("run", str(job), "--input", str(tmp_path / "Pictures"), "--json", "--quiet"))
    assert (ran["items"], ran["done"]) == (5, 5)
    note = f"cogbatch: using the input of the last run: Pictures (recorded in out.cogbatch{os.sep})"

    status = cogbatch_cmd("status", str(job), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stderr.strip().splitlines() == [note]
    report = json.loads(status.stdout)
    assert report["items"] == 5 and report["tasks"]["caption"] == {"ok": 5, "error": 0, "stale": 0, "pending": 0}

    txt = cogbatch_cmd("export", str(job), "--format", "txt", "--json", cwd=tmp_path)
    assert txt.returncode == 0, txt.stderr
    assert note in txt.stderr.splitlines() and json.loads(txt.stdout)["written"] == 5
    assert sorted(p.name for p in (tmp_path / "Pictures").glob("*.txt")) == sorted(f"{p.stem}.txt" for p in pictures)
    assert not list((tmp_path / "images").glob("*.txt"))  # the job's own folder: untouched

    line = cogbatch_cmd("schedule", str(job), "--cron", "0 2 * * *", "--limit", "2", "--json", cwd=tmp_path)
    assert line.returncode == 0, line.stderr
    args = shlex.split(json.loads(line.stdout)["line"])
    assert args[args.index("--input") + 1] == str(tmp_path / "Pictures")  # absolute: cron starts elsewhere
    assert args[args.index("--limit") + 1] == "2"

    again = summary_of(cogbatch_cmd("run", str(job), "--json", "--quiet"))  # run follows it too: nothing to do
    assert (again["items"], again["pending"]) == (5, 0)
    own = summary_of(cogbatch_cmd("run", str(job), "--input", str(tmp_path / "images"), "--json", "--quiet"))
    assert (own["items"], own["done"]) == (3, 3)  # --input points the output at another input: recorded
    status = cogbatch_cmd("status", str(job), "--json", cwd=tmp_path)
    assert status.stderr == "" and json.loads(status.stdout)["items"] == 3  # the job's own input again: no note
    assert read_results(tmp_path / "out").num_rows == 8


def test_compact_of_a_folder_that_is_not_an_output_exits_2_and_leaves_it_as_it_was(tmp_path):
    images = tmp_path / "images"
    make_images(images, 2)
    before = sorted(os.listdir(images))
    res = cogbatch_cmd("compact", str(images))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not a cogbatch output" in res.stderr
    assert sorted(os.listdir(images)) == before and not state_dir(images).exists()


def test_fail_on_error_exits_3_while_the_output_holds_current_error_rows(tmp_path, job_factory):
    make_images(tmp_path / "images", 2)
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    job = job_factory(tasks=CAPTION)
    first = cogbatch_cmd("run", str(job), "--json", "--quiet")
    assert first.returncode == 0 and summary_of(first)["failed"] == 1  # without the flag: a bad file is a row
    again = cogbatch_cmd("run", str(job), "--fail-on-error", "--json", "--quiet")
    assert again.returncode == 3, again.stderr  # nothing new failed, but the output still holds the error row
    assert summary_of(again)["pending"] == 0
    make_images(tmp_path / "fixed", 1, seed=5)[0].replace(bad)
    fixed = cogbatch_cmd("run", str(job), "--fail-on-error", "--json", "--quiet")
    assert fixed.returncode == 0, fixed.stderr  # new bytes: the item is redone, its current row is ok
    assert summary_of(fixed)["done"] == 1

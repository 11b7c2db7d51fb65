"""`cogbatch.store.state`: where an output's state lives, reading an old layout's, the recorded input."""

from __future__ import annotations

from pathlib import Path

import pytest

import cogbatch.store.state as state
from cogbatch.store.state import (
    HASHES,
    HISTORY,
    legacy_file,
    part_temp_dir,
    readable,
    record_input,
    recorded_input,
    state_dir,
    state_file,
)


def test_the_state_directory_is_the_outputs_sibling(tmp_path, monkeypatch):
    assert state_dir(Path("/data/outputs/caption")) == Path("/data/outputs/caption.cogbatch")
    assert state_dir("/data/outputs/caption/") == Path("/data/outputs/caption.cogbatch")  # a trailing slash
    monkeypatch.chdir(tmp_path)
    assert state_dir("outputs/caption") == tmp_path / "outputs" / "caption.cogbatch"  # relative: from here
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert state_dir("link") == tmp_path / "link.cogbatch"  # where the user sees the output, not the link's target
    assert state_file("outputs/caption", HISTORY) == tmp_path / "outputs" / "caption.cogbatch" / "runs.jsonl"


def test_readable_prefers_the_state_directory_and_falls_back_to_the_old_layout(tmp_path):
    out = tmp_path / "out"
    assert readable(out, HASHES) == state_file(out, HASHES)  # neither: where it will be written
    old = legacy_file(out, HASHES)
    assert old == out / ".cogbatch" / "hashes.parquet"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    assert readable(out, HASHES) == old
    state_dir(out).mkdir()
    state_file(out, HASHES).write_bytes(b"new")
    assert readable(out, HASHES) == state_file(out, HASHES)
    assert legacy_file(out, "input.json") is None  # new in this layout: nothing to fall back to


def test_the_recorded_input_round_trips_and_a_damaged_note_is_none(tmp_path):
    out = tmp_path / "out"
    assert recorded_input(out) is None
    record_input(out, tmp_path / "photos", "folder", "run1")
    assert recorded_input(out) == tmp_path / "photos" and not out.exists()  # only the state directory
    record_input(out, tmp_path / "m.parquet", "manifest", "run2")
    assert recorded_input(out) == tmp_path / "m.parquet"
    state_file(out, "input.json").write_text("{not json")
    assert recorded_input(out) is None


def test_part_temp_files_go_to_the_state_directory_unless_the_output_is_a_mount_point(tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert part_temp_dir(out) == state_file(out, "tmp")
    monkeypatch.setattr(state, "same_file_system", lambda a, b: False)  # the output: another file system's mount
    assert part_temp_dir(out) == out  # a rename across file systems would not be atomic


@pytest.mark.parametrize("name", sorted(state.LEGACY))
def test_every_state_file_of_the_old_layout_was_inside_the_output(tmp_path, name):
    old = legacy_file(tmp_path / "out", name)
    assert tmp_path / "out" in old.parents and state_dir(tmp_path / "out") not in old.parents

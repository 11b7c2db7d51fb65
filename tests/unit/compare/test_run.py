"""Sampling the job's images, greedy settings, where the pairs may go (no model loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cogbatch.compare.run import _greedy, _pairs_path, sample_entries
from cogbatch.errors import ConfigError
from cogbatch.inputs.entries import ImageEntry
from cogbatch.job import load_job


def _entries(n):
    return [ImageEntry(f"id{i}", f"img_{i:02d}.png") for i in range(n)]


def test_sampling_is_reproducible_and_in_path_order():
    entries = _entries(20)
    first, readable = sample_entries(list(reversed(entries)), 5, seed=0)
    assert readable == 20 and len(first) == 5
    assert sample_entries(entries, 5, seed=0)[0] == first  # the scan order does not matter
    assert [e.path for e in first] == sorted(e.path for e in first)
    assert {e.path for e in sample_entries(entries, 5, seed=1)[0]} != {e.path for e in first}


def test_sampling_skips_unreadable_images_and_duplicate_bytes():
    entries = [*_entries(3), ImageEntry("bad", "missing.png", error="file not found"), ImageEntry("id0", "copy.png")]
    chosen, readable = sample_entries(entries, 10, seed=0)
    assert readable == 3 and [e.image_id for e in chosen] == ["id0", "id1", "id2"]


def _job(tmp_path, **keys):
    job = {"model": "tiny-random:cogvlm", "input": {"folder": str(tmp_path)}, "output": str(tmp_path / "out"),
           "generation": {"do_sample": True, "retry_on_repetition": 2},
           "tasks": [{"name": "caption", "prompt": "Describe.", "max_new_tokens": 7}], **keys}  # fmt: skip
    return load_job(job)


def test_both_sides_decode_greedily_with_the_tasks_lengths(tmp_path):
    gen = _greedy(_job(tmp_path)).tasks[0].generation
    assert (gen.do_sample, gen.retry_on_repetition, gen.max_new_tokens) == (False, 0, 7)


def test_the_pairs_file_never_goes_into_the_output(tmp_path):
    cfg = _job(tmp_path)
    assert _pairs_path(cfg, None).parent == tmp_path / "out.cogbatch"
    assert _pairs_path(cfg, tmp_path / "p.parquet") == tmp_path / "p.parquet"
    with pytest.raises(ConfigError, match="inside the output"):
        _pairs_path(cfg, tmp_path / "out" / "sub" / "p.parquet")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        _pairs_path(cfg, Path(tmp_path / "dir"))


def test_a_reference_that_cannot_fit_on_the_gpu_runs_on_the_cpu_and_says_so(tmp_path, golden_dir):
    from cogbatch.compare.run import _reference_placement

    model = str(golden_dir / "cogvlm1" / "dev")  # planned from its config.json alone: no GPU needed here
    cfg = _job(tmp_path, model=model, device="cuda", vram_ceiling="1MiB", quantization="none")
    moved, notes = _reference_placement(cfg, None)
    assert moved.device == "cpu" and len(notes) == 1 and "runs on the CPU" in notes[0]
    kept, notes = _reference_placement(_job(tmp_path, model=model, device="cuda", quantization="none"), None)
    assert kept.device == "cuda" and notes == []
    asked, notes = _reference_placement(cfg, "cuda")  # --against-device: the user's choice stands
    assert asked.device == "cuda" and notes == []

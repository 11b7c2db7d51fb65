"""The reference fixtures of tests/data/golden: checked by SHA256SUMS, restored exactly, reproducible by the trim."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from tests.golden import (
    CASES,
    SUMS,
    WEIGHTS_SEED,
    GoldenError,
    check_sums,
    golden_configs,
    golden_root,
    materialize,
    read_sums,
    redraw_weights,
    sha256,
)
from tests.scripts import import_script


def test_every_fixture_matches_sha256sums():
    assert check_sums(golden_root()) == []
    assert len(read_sums(golden_root())) >= 20


def test_a_changed_missing_or_unlisted_fixture_is_named(tmp_path):
    root = tmp_path / "golden"
    shutil.copytree(golden_root(), root)
    cases = root / "cogvlm1" / "dev" / CASES
    data = bytearray(cases.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    cases.write_bytes(bytes(data))
    (root / "templates_cogvlm2.json").unlink()
    (root / "images" / "stray.png").write_bytes(b"")
    assert check_sums(root) == [
        f"{cases} does not match its SHA-256 in {SUMS} (corrupted or changed)",
        f"{root / 'templates_cogvlm2.json'} is missing",
        f"{root / 'images' / 'stray.png'} is not listed in {SUMS}",
    ]
    with pytest.raises(GoldenError, match="git checkout -- tests/data/golden") as e:
        materialize(tmp_path / "restored", root)
    assert str(cases) in str(e.value) and "templates_cogvlm2.json is missing" in str(e.value)
    assert not (tmp_path / "restored").exists()


def test_redrawn_weights_are_the_reference_bytes(golden_dir):
    specs = sorted(golden_root().glob(f"cogvlm*/*/{WEIGHTS_SEED}"))
    assert [p.parent.relative_to(golden_root()).as_posix() for p in specs] == ["cogvlm2/dev"]
    for spec in specs:
        rel = spec.parent.relative_to(golden_root())
        assert not (spec.parent / "model.safetensors").exists()
        assert sha256(golden_dir / rel / "model.safetensors") == json.loads(spec.read_text())["sha256"]


def test_weights_that_do_not_redraw_exactly_are_refused(tmp_path):
    ckpt = tmp_path / "cogvlm2" / "dev"
    ckpt.mkdir(parents=True)
    shutil.copyfile(golden_root() / "cogvlm2" / "dev" / "config.json", ckpt / "config.json")
    spec = json.loads((golden_root() / "cogvlm2" / "dev" / WEIGHTS_SEED).read_text())
    (ckpt / WEIGHTS_SEED).write_text(json.dumps({**spec, "seed": spec["seed"] + 1}))
    with pytest.raises(GoldenError, match=r"cogvlm2/dev \(seed 3004\) are not the reference's"):
        redraw_weights(ckpt / WEIGHTS_SEED, ckpt / "model.safetensors")
    assert not (ckpt / "model.safetensors").exists()


def test_rows_stored_once_are_restored(golden_dir):
    trim = import_script("trim_golden")
    for config in golden_configs():
        rel = config.relative_to(golden_root())
        with safe_open(str(config / CASES), "pt") as f:
            duplicates = json.loads(f.metadata()["duplicates"])
            stored = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
        cases = load_file(golden_dir / rel / CASES)
        assert sorted(cases) == sorted(trim.CASE_TENSORS)
        assert sorted(duplicates) == sorted(trim.DUPLICATES), rel  # every duplicate held in this reference
        for name, spec in duplicates.items():
            if "same_as" in spec:
                assert cases[name].equal(cases[spec["same_as"]])
                continue
            source, *index = spec["row"]
            assert list(cases[name].shape) == [stored[spec["rows"]][0] + 1, *stored[spec["rows"]][1:]]
            assert cases[name][spec["insert_at"]].equal(cases[source][tuple(index)])
        assert cases["b_step_logits"].shape[0] == cases["b_new_tokens"].shape[1] == 8


def test_the_trim_script_reproduces_the_committed_fixtures(golden_dir, tmp_path):
    """Trimming the restored fixtures again gives the committed files byte for byte (SHA256SUMS equal)."""
    full = tmp_path / "full"
    shutil.copytree(golden_dir, full)
    files = sorted(p for p in full.rglob("*") if p.is_file() and p.name != SUMS)
    (full / SUMS).write_text("".join(f"{sha256(p)}  {p.relative_to(full).as_posix()}\n" for p in files))
    out = tmp_path / "out"
    assert import_script("trim_golden").main([str(full), "--out", str(out)]) == 0
    assert (out / SUMS).read_text() == (golden_root() / SUMS).read_text()

"""Model names work in every command, an unknown one says where aliases come from, and a failure leaves no folder."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from cogbatch.cli import cli
from tests.e2e.conftest import make_images


def _job(tmp_path, model: str, **keys) -> str:
    make_images(tmp_path / "images", 1)
    task = {"name": "caption", "prompt": "Describe.", "max_new_tokens": 2}
    job = {"model": model, "input": {"folder": "images"}, "output": "results/out", "device": "cpu",
           "quantization": "none", "tasks": [task], **keys}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return "job.yaml"


def _dirs(tmp_path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir()}


COMMANDS = [
    ["run", "job.yaml"],
    ["status", "job.yaml"],
    ["export", "job.yaml", "--format", "jsonl", "--dest", "exported/x"],
    ["gallery", "job.yaml", "--dest", "pages/x/index.html"],
    ["plan", "job.yaml"],
    ["quantize", "cogvlm2", "--out", "qcache/new"],
    ["plan", "--model", "cogvlm2"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_an_alias_without_a_pipeline_file_is_explained_by_every_command(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # no pipeline.yaml here or above
    _job(tmp_path, "cogvlm2")
    before = _dirs(tmp_path)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith("Error: model: 'cogvlm2' is not a directory, a hub id or an alias; aliases come from "
                           f"pipeline.yaml (none found in {tmp_path}")  # fmt: skip
    assert "known hub ids: THUDM/cogvlm-chat-hf" in line and "\n" not in line
    assert _dirs(tmp_path) == before  # no output, export, gallery or cache folder was made


def test_a_run_refused_before_any_work_leaves_no_new_output_folder(tmp_path, monkeypatch):
    """An uncached hub id (offline), a missing CUDA device: exit 2 and no `results/out` left behind."""
    import torch

    monkeypatch.chdir(tmp_path)
    _job(tmp_path, "someone/not-downloaded")
    before = _dirs(tmp_path)
    res = CliRunner().invoke(cli, ["run", "job.yaml", "--quiet"])
    assert res.exit_code == 2 and "could not be fetched from the hub" in res.output
    assert _dirs(tmp_path) == before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _job(tmp_path, "tiny-random:cogvlm2", device="cuda")
    res = CliRunner().invoke(cli, ["run", "job.yaml", "--quiet"])
    assert res.exit_code == 2 and "torch sees no CUDA device" in res.output
    assert _dirs(tmp_path) == before


def test_quantize_that_fails_leaves_no_empty_cache_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["quantize", "someone/not-downloaded", "--out", "new/cache"])
    assert res.exit_code == 2 and "could not be fetched from the hub" in res.output
    assert not (tmp_path / "new").exists()


def test_tiny_random_names_work_in_quantize_plan_and_status(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["quantize", "tiny-random:cogvlm", "--out", "qcache", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["cache_status"] == "written"
    assert (tmp_path / "qcache" / "tiny-random" / "cogvlm" / "config.json").is_file()
    res = CliRunner().invoke(cli, ["plan", "--model", "tiny-random:cogvlm", "--device", "cpu", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["generation"] == "cogvlm1"
    _job(tmp_path, "tiny-random:cogvlm")
    res = CliRunner().invoke(cli, ["status", "job.yaml"])
    assert res.exit_code == 0 and "1 pending" in res.output

"""Checkpoint loading: what is refused, and how the refusal reads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.weights import CheckpointError, resolve_checkpoint, weight_files


@pytest.fixture
def ckpt(tiny_cogvlm1, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may tamper with."""
    return Path(shutil.copytree(tiny_cogvlm1, tmp_path / "ckpt"))


def _rewrite(ckpt: Path, edit) -> None:
    """Apply `edit` to the merged state dict and write it back as a single model.safetensors."""
    tensors = {}
    for f in weight_files(ckpt):
        tensors.update(load_file(f))
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def test_loads_sharded_and_single_file_alike(ckpt):
    sharded = CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    _rewrite(ckpt, lambda t: None)
    single = CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.is_meta for p in single.parameters())


def test_dtype_is_applied_to_every_parameter(ckpt):
    model = CogVLM.from_pretrained(ckpt, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_unexpected_and_misshapen_tensors_are_listed(ckpt):
    def edit(t):
        del t["model.layers.0.mlp.vision_mlp.up_proj.weight"]
        t["model.extra.weight"] = torch.zeros(2)
        t["lm_head.weight"] = torch.zeros(3, 3)

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as err:
        CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    msg = str(err.value)
    assert "missing tensors: model.layers.0.mlp.vision_mlp.up_proj.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg
    assert "lm_head.weight (3, 3)" in msg


def test_pickled_weights_are_refused(ckpt):
    for f in weight_files(ckpt):
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"only pickled weights.*safetensors only"):
        CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")


def test_missing_shard_is_named(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"].values()))
    (ckpt / first).unlink()
    with pytest.raises(CheckpointError, match=first):
        CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")


def test_uncached_hub_id_offline_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1 and an empty HF_HOME: nothing may be downloaded.
    with pytest.raises(CheckpointError, match="could not be fetched from the hub"):
        resolve_checkpoint("THUDM/cogvlm2-llama3-chat-19B")


@pytest.mark.parametrize("name", ["./no/such/dir", "not-a-hub-id", "a/b/c"])
def test_nonexistent_paths_are_not_mistaken_for_hub_ids(name):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(name)


def test_a_file_is_not_a_checkpoint(ckpt):
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(ckpt / "config.json")


def test_cogvlm1_without_tokenizer_falls_back_to_vicuna(ckpt):
    for name in ("tokenizer.json", "tokenizer.model"):
        (ckpt / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=re.escape("lmsys/vicuna-7b-v1.5")):
        CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu")


def test_explicit_tokenizer_is_used(ckpt, tiny_cogvlm1):
    for name in ("tokenizer.json", "tokenizer.model"):
        (ckpt / name).unlink(missing_ok=True)
    model = CogVLM.from_pretrained(ckpt, dtype="float32", device="cpu", tokenizer=tiny_cogvlm1)
    assert model.tokenizer.bos_token_id == model.config.bos_token_id

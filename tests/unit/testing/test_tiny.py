"""`cogbatch.testing.tiny`: the tiny checkpoint maker writes the official layout and the golden init scheme."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.testing import tiny
from cogbatch.testing.tiny import write_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "scripts" / "make_tiny_checkpoint.py"
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def read_index(ckpt: Path) -> dict:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def shard_contents(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """file name -> {tensor name: tensor} for every shard file on disk."""
    return {p.name: load_file(p) for p in sorted(ckpt.glob("model-*-of-*.safetensors"))}


# --------------------------------------------------------------------------------------------
# weights and index


@pytest.mark.parametrize("fixture", ["tiny_cogvlm1", "tiny_cogvlm2"])
def test_tensors_are_exactly_the_official_names_shapes_and_order(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    expected = checkpoint_tensor_shapes(CogVLMConfig.from_json(ckpt))
    index = read_index(ckpt)
    assert list(index["weight_map"]) == list(expected)
    found = {name: tuple(t.shape) for tensors in shard_contents(ckpt).values() for name, t in tensors.items()}
    assert found == expected


@pytest.mark.parametrize("fixture", ["tiny_cogvlm1", "tiny_cogvlm2"])
def test_index_maps_every_tensor_once_and_counts_its_bytes(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    index = read_index(ckpt)
    shards = shard_contents(ckpt)
    names_on_disk = [name for tensors in shards.values() for name in tensors]
    assert len(names_on_disk) == len(set(names_on_disk)) == len(index["weight_map"])
    for file, tensors in shards.items():
        assert all(index["weight_map"][name] == file for name in tensors)
    tensor_bytes = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    assert index["metadata"]["total_size"] == tensor_bytes
    assert set(index) == {"metadata", "weight_map"}


def test_one_shard_is_still_written_in_sharded_form(tiny_cogvlm1):
    files = sorted(p.name for p in tiny_cogvlm1.iterdir())
    assert files == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    with safe_open(tiny_cogvlm1 / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers warns on shards without it


def test_small_shard_size_splits_into_shards_within_the_limit(tmp_path):
    limit = 60_000  # bytes; embed_tokens and lm_head (512 x 64 fp16 = 65536 B) exceed it on their own
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", dtype="fp16", shard_size=limit)
    shards = shard_contents(ckpt)
    n = len(shards)
    assert n > 3
    assert list(shards) == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(read_index(ckpt)["weight_map"].values()) == set(shards)
    oversized = 0
    for tensors in shards.values():
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > limit:
            assert len(tensors) == 1, "only a single tensor larger than the limit may overflow a shard"
            oversized += 1
    assert oversized == 2


def test_shard_plan_fills_greedily_in_generation_order():
    shapes = {"c": (10,), "a": (10,), "b": (30,), "d": (5,)}
    assert tiny.plan_shards(shapes, itemsize=1, max_shard_bytes=20) == [["a"], ["b"], ["c", "d"]]
    assert tiny.plan_shards(shapes, itemsize=1, max_shard_bytes=10**6) == [["a", "b", "c", "d"]]


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "name"), [("fp16", torch.float16, "float16"), ("bf16", torch.bfloat16, "bfloat16")]
)
def test_dtype_is_honoured_by_every_tensor_and_the_config(tmp_path, dtype, torch_dtype, name):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", dtype=dtype)
    tensors = {k: v for shard in shard_contents(ckpt).values() for k, v in shard.items()}
    assert {t.dtype for t in tensors.values()} == {torch_dtype}
    cfg = CogVLMConfig.from_json(ckpt)
    assert cfg.torch_dtype == name
    expected_bytes = sum(math.prod(s) for s in checkpoint_tensor_shapes(cfg).values()) * ITEMSIZE[torch_dtype]
    assert read_index(ckpt)["metadata"]["total_size"] == expected_bytes
    inv_freq = tensors["model.layers.1.self_attn.rotary_emb.inv_freq"]
    theta, hd = 10_000.0, cfg.head_dim
    reference = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    assert torch.equal(inv_freq, reference.to(torch_dtype))


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7, shard_size="200KB")
    b = write_tiny_checkpoint(tmp_path / "b", seed=7, shard_size="200KB")
    c = write_tiny_checkpoint(tmp_path / "c", seed=8, shard_size="200KB")
    names = sorted(p.name for p in a.iterdir())
    assert len([n for n in names if n.startswith("model-")]) > 1
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    wa = {k: v for shard in shard_contents(a).values() for k, v in shard.items()}
    wc = {k: v for shard in shard_contents(c).values() for k, v in shard.items()}
    random = [k for k in wa if not k.endswith("inv_freq")]
    assert not any(torch.equal(wa[k], wc[k]) for k in random)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()  # seed is for weights only


@pytest.mark.parametrize(
    ("arch", "kwargs", "seed"),
    [
        ("cogvlm1", {}, 1001),
        ("cogvlm2", {"hidden_size": 32, "heads": 4, "kv_heads": 2, "intermediate_size": 80}, 3003),
    ],
)
def test_golden_dev_shapes_and_seed_reproduce_the_golden_weights(tmp_path, golden_dir, arch, kwargs, seed):
    """The init scheme, the visiting order and the seeded draws are exactly the golden harness's."""
    ckpt = write_tiny_checkpoint(tmp_path / arch, arch=arch, seed=seed, **kwargs)
    dev = golden_dir / arch / "dev"
    assert (ckpt / "config.json").read_bytes() == (dev / "config.json").read_bytes()
    ours = load_file(ckpt / "model-00001-of-00001.safetensors")
    golden = load_file(dev / "model.safetensors")
    assert ours.keys() == golden.keys()
    different = [name for name in golden if not torch.equal(ours[name], golden[name])]
    assert not different


def test_chunked_draws_equal_one_randn_call(monkeypatch):
    """Large tensors are drawn in chunks; the values must not depend on the chunk size."""
    monkeypatch.setattr(tiny, "_RANDN_CHUNK", 64)
    shape = (9, 23)  # 207 values: three full chunks, then 15 left over, folded into the last chunk
    gen = torch.Generator().manual_seed(5)
    chunked = tiny._random_tensor(shape, (1.0, 1.0, 0.0), gen, torch.float32)
    after_chunked = torch.randn(4, generator=gen)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(chunked, torch.randn(shape, generator=gen))
    assert torch.equal(after_chunked, torch.randn(4, generator=gen))


# --------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("arch", ["cogvlm1", "cogvlm2"])
def test_config_has_the_golden_and_real_key_structure(golden_dir, tiny_cogvlm1, tiny_cogvlm2, arch):
    ours = json.loads(((tiny_cogvlm1 if arch == "cogvlm1" else tiny_cogvlm2) / "config.json").read_text())
    real = "cogvlm-chat-hf" if arch == "cogvlm1" else "cogvlm2-llama3-chat-19B"
    for reference in (golden_dir / arch / "dev" / "config.json", golden_dir / "real_configs" / real / "config.json"):
        ref = json.loads(reference.read_text())
        assert list(ours) == list(ref)
        assert list(ours["vision_config"]) == list(ref["vision_config"])
        for key in ("architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "template_version"):
            assert ours[key] == ref[key], key


def test_config_defaults_follow_the_documented_rules(tmp_path):
    c1 = tiny.tiny_config()
    assert (c1["num_attention_heads"], c1["intermediate_size"], c1["vocab_size"]) == (4, 128, 512)
    assert "num_multi_query_heads" not in c1
    assert c1["vision_config"]["num_positions"] == (56 // 14) ** 2 + 1
    c2 = tiny.tiny_config(arch="cogvlm2", hidden_size=1024, vision_hidden_size=1024, image_size=224)
    assert (c2["num_attention_heads"], c2["num_multi_query_heads"]) == (8, 4)  # head_dim 128 from hidden 512
    assert c2["vision_config"]["num_heads"] == 8
    assert c2["vision_config"]["num_positions"] == 16**2 + 1
    assert (c2["bos_token_id"], c2["eos_token_id"], c2["pad_token_id"]) == (128000, [128001, 128009], 128002)
    assert tiny.tiny_config(arch="cogvlm2", hidden_size=32, heads=2)["num_multi_query_heads"] == 1


def test_written_shards_read_back_exactly(tmp_path):
    """Shards (also bench_gpu's full-size ones) hold every tensor's bytes as they were, empty tensors too."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g).to(torch.float16),
        "c.boi": torch.randn(1, 1, 4, generator=g),
        "d.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }
    path = tmp_path / "x.safetensors"
    tiny.write_shard(path, tensors)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            back = f.get_tensor(name)
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(back.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------------------------
# invalid arguments and the output folder


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "cogvlm2", "hidden_size": 32, "heads": 4, "image_size": 98}, "even number of patches"),
        ({"hidden_size": 64, "heads": 5}, "hidden_size must be divisible by num_attention_heads"),
        ({"hidden_size": 40}, "not a multiple of the default head_dim 16"),
        ({"hidden_size": 64, "heads": 8, "kv_heads": 4}, "kv_heads=4 must equal heads=8"),
        ({"arch": "cogvlm2", "hidden_size": 32, "heads": 4, "kv_heads": 3}, "divisible by num_multi_query_heads"),
        ({"hidden_size": 48, "heads": 16}, "head_dim = hidden_size/heads = 3 must be even"),
        ({"arch": "cogvlm2", "hidden_size": 32, "vocab_size": 32000}, "vocab_size >= 128256"),
        ({"vocab_size": 300}, "too small for the cogvlm1 tiny tokenizer"),
        ({"image_size": 50}, "image_size must be divisible by vision_config.patch_size"),
        ({"layers": 0}, "layers must be a positive integer"),
        ({"arch": "llava"}, "unknown arch 'llava'"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"shard_size": "12XB"}, "cannot read a size from '12XB'"),
    ],
)
def test_invalid_arguments_raise_before_anything_is_written(tmp_path, kwargs, message):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=re.escape(message)):
        write_tiny_checkpoint(out, **kwargs)
    assert not out.exists()


def test_non_empty_folder_needs_overwrite_which_clears_stale_shards(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", shard_size=100_000)
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    (ckpt / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_tiny_checkpoint(ckpt)
    write_tiny_checkpoint(ckpt, overwrite=True)
    assert [p.name for p in ckpt.glob("model-*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert (ckpt / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# command line


def test_script_help_runs():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for flag in ("--out", "--arch", "--kv-heads", "--vision-intermediate-size", "--shard-size", "--seed"):
        assert flag in result.stdout


def test_script_writes_a_checkpoint_and_prints_one_summary_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path / "ckpt"), "--dtype", "fp16", "--shard-size", "300KB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert re.match(r"[\d,]+ parameters, [\d,]+ bytes fp16 in \d+ shards -> .*ckpt \(\d+\.\d s\)$", lines[0])
    with pytest.raises(SystemExit) as exc:
        script.main(["--out", str(tmp_path / "bad"), "--hidden-size", "40"])
    assert exc.value.code == 2
    assert "head_dim" in capsys.readouterr().err

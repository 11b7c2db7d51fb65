"""`cogbatch.model.quant.cache` and `cachefile`: keys, entries, checksums; a doubtful entry is rebuilt."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
import types
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import cogbatch.model.quant.cache as QC
import cogbatch.model.quant.cachefile as CF
import cogbatch.model.quant.loader as Q
from cogbatch.model.quant.cache import cache_key, target_fields
from cogbatch.model.quant.flat import flatten
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.model.weights import DERIVED_SUFFIXES, weight_files
from tests.unit.quant.helpers import (
    MIXED,
    flat,
    load,
    logits,
    qweights,
)


def test_cache_round_trip_hits_without_requantizing(ckpt, cache_dir, monkeypatch):
    first = load(ckpt, MIXED, cache_dir)
    assert not first.load_report.cache_hit and first.load_report.cache_status == "written"
    entry = Path(first.load_report.cache_path)
    sidecar = json.loads((entry / CF.CACHE_SIDECAR).read_text())
    assert "lm_head" not in sidecar["layers"]  # kept in 16-bit by the rules
    assert sidecar["quantization_map"]["model.layers.0.mlp.vision_mlp.up_proj"]["weights"] == "qint8"
    fc1 = sidecar["layers"]["model.vision.transformer.layers.0.mlp.fc1"]
    assert fc1 == {"weights": "int4", "group_size": 64, "kernel": "fallback"}
    assert sidecar["layers"]["model.layers.0.mlp.language_mlp.up_proj"]["kernel"] == "tinygemm-cpu"
    assert "on_write" in sidecar["verified"] and "on_first_use" not in sidecar["verified"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("re-quantized although the cache is valid")

    monkeypatch.setattr(Q, "stream_quantize", must_not_run)
    second = load(ckpt, MIXED, cache_dir)
    report = second.load_report
    assert report.cache_hit and report.cache_status == "hit" and report.cache_path == str(entry)
    assert report.quantize_s == 0 and report.read_s == 0 and report.pack_s == 0 and report.cache_read_s > 0
    assert report.verify_s > 0  # the entry's first use checks every checksum ...
    assert "on_first_use" in json.loads((entry / CF.CACHE_SIDECAR).read_text())["verified"]
    assert load(ckpt, MIXED, cache_dir).load_report.verify_s == 0  # ... and records it: later loads do not
    assert torch.equal(logits(first), logits(second))
    for name, w in qweights(first).items():
        assert all(torch.equal(x, y) for x, y in zip(flat(w), flat(qweights(second)[name]), strict=True)), name


def test_concurrent_first_loads_quantize_once(ckpt, cache_dir, monkeypatch):
    """Two processes (Ray actors, two jobs) loading the same model at once: one quantizes, the other waits
    for its cache entry and reads it, instead of both quantizing and racing to publish."""
    import threading
    import time

    built, real_build = [], Q._build

    def slow_build(*args, **kwargs):
        built.append(threading.get_ident())
        time.sleep(1.0)  # long enough for the other load to reach the entry while this one quantizes
        return real_build(*args, **kwargs)

    monkeypatch.setattr(Q, "_build", slow_build)
    reports: list = []
    threads = [threading.Thread(target=lambda: reports.append(load(ckpt, "int4", cache_dir).load_report))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1
    assert sorted(r.cache_status for r in reports) == ["hit", "written"]


def test_cache_file_holds_the_models_tensors_in_their_kernels_layout(ckpt, cache_dir):
    """Every quantized weight's inner tensors as the model holds them (TinyGemm's CPU packing, quanto's
    portable layout for the fallback, int8), every other tensor in the compute dtype: nothing to repack."""
    model = load(ckpt, MIXED, cache_dir)
    cached = load_file(Path(model.load_report.cache_path) / CF.CACHE_WEIGHTS)
    expected = {}
    for name, w in qweights(model).items():
        _, leaves = flatten(w, f"{name}.weight")
        expected.update(leaves)
    quantized = set(qweights(model))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf in ("weight", "input_scale", "output_scale"):
            continue  # the weight's inner tensors are above; the activation scales are always 1
        if not name.endswith(DERIVED_SUFFIXES):
            expected[name] = t.data
    assert set(cached) == set(expected)
    for name, t in expected.items():
        assert cached[name].dtype == t.dtype and torch.equal(cached[name], t), name
    assert any(n.endswith("weight._scale_shift") for n in cached)  # TinyGemm's own scale-and-shift tensor


@pytest.fixture(scope="module")
def valid_cache(ckpt, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A cache root holding a valid int4 entry for `ckpt`, and the logits of that first load."""
    root = tmp_path_factory.mktemp("valid_cache")
    first = load(ckpt, "int4", root)
    assert first.load_report.cache_status == "written"
    return root, logits(first)


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def _flip_bytes(path: Path, tensor: str, offset: int | None = None, count: int = 16) -> None:
    """XOR `count` bytes of one tensor (from `offset`, default its middle) of a safetensors file in place:
    same size, same header."""
    a, b = _header(path)[tensor]["data_offsets"]
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start = 8 + n + a + ((b - a) // 2 if offset is None else offset)
        f.seek(start)
        data = bytearray(f.read(count))
        f.seek(start)
        f.write(bytes(x ^ 0x5A for x in data))


INT4_DATA = "model.layers.0.self_attn.language_expert_query_key_value.weight._data._data"  # direct TinyGemm


FALLBACK_DATA = "model.vision.transformer.layers.0.mlp.fc1.weight._data._data"  # group 64, read whole


@pytest.mark.parametrize(
    "damage",
    [
        "truncate",
        "garbage_header",
        "edit_sidecar_key",
        "edit_sidecar_group",
        "delete_sidecar",
        "drop_checksum",
        "flip_int4_bytes",
        "flip_last_block",
        "flip_fallback_bytes",
        "flip_scale",
        "flip_lm_head",
    ],
)
def test_corrupt_cache_falls_back_to_quantizing(ckpt, valid_cache, tmp_path, caplog, damage):
    root = Path(shutil.copytree(valid_cache[0], tmp_path / "cache"))
    (entry,) = (root / "quantized").iterdir()
    weights, side = entry / CF.CACHE_WEIGHTS, entry / CF.CACHE_SIDECAR
    sidecar = json.loads(side.read_text())
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    elif damage == "garbage_header":
        data = bytearray(weights.read_bytes())
        data[:8] = (10**9).to_bytes(8, "little")  # header length pointing past the end; same file size
        weights.write_bytes(bytes(data))
    elif damage == "delete_sidecar":
        side.unlink()
    elif damage.startswith("flip"):  # bit rot: the file keeps its size and header, one tensor's bytes change
        if damage == "flip_int4_bytes":
            _flip_bytes(weights, INT4_DATA, offset=0)
        elif damage == "flip_last_block":  # the last block of packed rows (the checksum is checked at the end)
            _flip_bytes(weights, INT4_DATA, offset=math.prod(sidecar["tensors"][INT4_DATA][0]) - 16)
        elif damage == "flip_fallback_bytes":
            _flip_bytes(weights, FALLBACK_DATA, offset=0)
        elif damage == "flip_lm_head":  # among the last reads: caught by the check that waits for all of them
            _flip_bytes(
                weights,
                "lm_head.weight._data._data",
                offset=-16 + math.prod(sidecar["tensors"]["lm_head.weight._data._data"][0]),
            )
        else:
            _flip_bytes(weights, "model.layers.1.mlp.language_mlp.down_proj.weight._scale_shift", offset=0, count=2)
    else:
        if damage == "edit_sidecar_key":
            sidecar["key"] = "0" * 64
        elif damage == "drop_checksum":
            del sidecar["checksums"][INT4_DATA]
        else:
            sidecar["layers"]["lm_head"]["group_size"] = 64
        side.write_text(json.dumps(sidecar))
    with caplog.at_level(logging.WARNING, logger="cogbatch"):
        second = load(ckpt, "int4", root)
    assert "ignoring the quantized-weights cache" in caplog.text
    if damage.startswith("flip"):
        assert "checksum mismatch" in caplog.text
    assert not second.load_report.cache_hit and second.load_report.cache_status.startswith("stale")
    assert torch.equal(logits(second), valid_cache[1])
    third = load(ckpt, "int4", root)  # the rebuilt entry is valid again
    assert third.load_report.cache_hit and third.load_report.cache_path == str(entry)
    assert torch.equal(logits(third), valid_cache[1])


def test_cache_key_covers_rules_dtype_content_layout_and_public_versions(ckpt, tmp_path, monkeypatch):
    files = weight_files(ckpt)
    base = QuantConfig.parse(MIXED)
    kernels = {"model.layers.0.mlp.language_mlp.up_proj": "tinygemm-cpu", "lm_head": "int8"}
    layout = target_fields("cpu-avx512", kernels)

    def key(path: Path = ckpt, quant: QuantConfig = base, dtype: torch.dtype = torch.bfloat16, target=layout) -> str:
        return cache_key(path, weight_files(path), quant, dtype, target)[0]

    ours = key()
    assert key() == ours
    # the layout: TinyGemm's CPU packing differs per ISA, a GPU's per arch, and each layer's kernel decides its bytes
    assert key(target=target_fields("cpu-avx2", kernels)) != ours
    assert key(target=target_fields("cuda-sm90", kernels)) != ours
    assert key(target=target_fields("cpu-avx512", {**kernels, "lm_head": "fallback"})) != ours
    assert key(quant=QuantConfig.parse({**MIXED, "embeddings_on_cpu": True})) == ours  # placement only
    assert key(quant=QuantConfig.parse({**MIXED, "kv_cache": "int8"})) == ours  # the KV cache changes no weight
    assert key(quant=QuantConfig.parse({**MIXED, "rules": MIXED["rules"][:1]})) != ours
    assert key(quant=QuantConfig.parse("int4-g64")) != ours
    assert key(dtype=torch.float16) != ours
    # portable: another path, other mtimes, the CPU or a CUDA build of the same torch release
    copy = Path(shutil.copytree(ckpt, tmp_path / "elsewhere" / "renamed"))
    os.utime(copy / files[0].name, ns=(0, 10**18))
    assert key(copy) == ours
    monkeypatch.setattr(torch, "__version__", torch.__version__.split("+")[0] + "+cu128")
    assert key() == ours
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert key() != ours
    monkeypatch.undo()
    # content: one tensor's bytes changed in place (same size, same header), or the config
    _flip_bytes(copy / files[0].name, next(iter(_header(files[0]))))
    assert key(copy) != ours
    copy2 = Path(shutil.copytree(ckpt, tmp_path / "copy2"))
    (copy2 / "config.json").write_text((ckpt / "config.json").read_text() + "\n")
    assert key(copy2) != ours


def test_an_entry_built_for_one_layout_never_feeds_another(ckpt, cache_dir, monkeypatch, caplog):
    """Another device class (here: another CPU ISA, whose TinyGemm packing differs) gets its own entry,
    and both stay: a GPU job and a CPU job may share one cache. An entry whose sidecar claims other
    kernels than this load's is refused, never loaded."""
    first = load(ckpt, "int4", cache_dir)
    monkeypatch.setattr(Q, "device_class", lambda device: "cpu-some-other-isa")
    other = load(ckpt, "int4", cache_dir)
    assert not other.load_report.cache_hit and other.load_report.cache_status == "written"
    assert other.load_report.cache_path != first.load_report.cache_path
    assert Path(first.load_report.cache_path).is_dir()  # not pruned as outdated
    monkeypatch.undo()
    entry = Path(first.load_report.cache_path)
    side = json.loads((entry / CF.CACHE_SIDECAR).read_text())
    side["layers"]["lm_head"]["kernel"] = "tinygemm-cuda"
    (entry / CF.CACHE_SIDECAR).write_text(json.dumps(side))
    with caplog.at_level(logging.WARNING, logger="cogbatch"):
        again = load(ckpt, "int4", cache_dir)
    assert not again.load_report.cache_hit and "kernels differ" in caplog.text


def test_cache_built_elsewhere_is_used(ckpt, tmp_path):
    """`cogbatch quantize` on another machine: same files under another directory name, new mtimes."""
    root = tmp_path / "cache"
    first = load(ckpt, "int4", root)
    moved = Path(shutil.copytree(ckpt, tmp_path / "another-machine" / "cogvlm-local"))
    for f in moved.iterdir():
        os.utime(f, ns=(0, 10**18))
    again = load(moved, "int4", root)
    assert again.load_report.cache_hit and again.load_report.cache_path == first.load_report.cache_path
    assert torch.equal(logits(again), logits(first))


def test_changed_weights_get_a_new_entry_and_the_old_one_is_removed(ckpt, cache_dir, tmp_path):
    """Fine-tuned in place (same names, shapes, sizes): a new key; the outdated entry of that directory goes."""
    copy = Path(shutil.copytree(ckpt, tmp_path / "copy"))
    first = load(copy, "int8", cache_dir)
    other_rules = load(copy, "int4", cache_dir)  # another job's entry for the same checkpoint: kept
    f = weight_files(copy)[0]
    for name in _header(f):  # every tensor changes, as in a fine-tune
        _flip_bytes(f, name, count=2)
    second = load(copy, "int8", cache_dir)
    assert not second.load_report.cache_hit and second.load_report.cache_status == "written"
    assert second.load_report.cache_path != first.load_report.cache_path
    assert not Path(first.load_report.cache_path).exists()
    assert Path(other_rules.load_report.cache_path).is_dir()


def test_new_library_versions_replace_the_old_entry(ckpt, cache_dir, monkeypatch):
    real = QC.library_versions
    monkeypatch.setattr(QC, "library_versions", lambda: {**real(), "optimum-quanto": "0.2.6"})
    old = load(ckpt, "int8", cache_dir)
    monkeypatch.undo()
    new = load(ckpt, "int8", cache_dir)
    assert not new.load_report.cache_hit and new.load_report.cache_path != old.load_report.cache_path
    assert not Path(old.load_report.cache_path).exists()
    assert [p.name for p in (cache_dir / "quantized").iterdir()] == [Path(new.load_report.cache_path).name]


def test_crashed_writers_temp_dirs_are_removed_after_a_write(ckpt, cache_dir):
    quantized = cache_dir / "quantized"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    host = CF.host_name()
    names = {
        "crashed": f".cogvlm-0123456789abcdef.tmp-{host}-{dead_pid}-0badc0de",
        "crashed_old_format": f".cogvlm-0123456789abcdef.tmp-{dead_pid}-0badc0de",
        "trash": ".cogvlm-0123456789abcdef.old-12345678",
        "live": f".cogvlm-0123456789abcdef.tmp-{host}-{os.getpid()}-0badc0de",  # a writer still at work
        "other_host": f".cogvlm-0123456789abcdef.tmp-some-other-host-{dead_pid}-0badc0de",  # cannot tell: kept
    }
    for name in names.values():
        (quantized / name).mkdir(parents=True)
        (quantized / name / CF.CACHE_WEIGHTS).write_bytes(b"partial")
    model = load(ckpt, "int8", cache_dir)
    assert model.load_report.cache_status == "written"
    left = {p.name for p in quantized.iterdir()}
    assert left == {names["live"], names["other_host"], Path(model.load_report.cache_path).name}


def test_cache_can_be_disabled_and_write_failures_do_not_crash(ckpt, tmp_path, caplog):
    model = load(ckpt, "int8", False)
    assert model.load_report.cache_status == "disabled" and model.load_report.cache_path is None
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")  # the cache root is a file: every write fails
    with caplog.at_level(logging.WARNING, logger="cogbatch"):
        model = load(ckpt, "int8", blocker)
    assert model.load_report.cache_status.startswith("not written")
    assert "going on without it" in caplog.text
    assert torch.isfinite(logits(model)).all()


# -- a cached load is a read ---------------------------------------------------------------------

_AUDIT: list[tuple[str, str]] = []  # (event, path) while a test listens; audit hooks cannot be removed
_AUDIT_ON: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _AUDIT_ON and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _AUDIT.append((event, os.fsdecode(args[0])))


sys.addaudithook(_audit)


class _OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active, by name (aten and custom ops such as quanto's)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def repacks(self) -> dict[str, int]:
        return {op: n for op, n in self.ops.items() if "int4pack" in op or op.startswith("quanto.")}


def test_a_cached_load_is_a_read(ckpt, cache_dir, monkeypatch):
    """No repack op at all (TinyGemm's packer, quanto's pack/unpack), and each file of the entry read once:
    its first use checksums every byte once through the same map its tensors view; later loads none."""
    first = load(ckpt, MIXED, cache_dir)
    entry = Path(first.load_report.cache_path)
    crc_bytes = []

    def counted_crc32(data, *args):
        crc_bytes.append(len(data))
        return zlib.crc32(data, *args)

    monkeypatch.setattr(CF, "zlib", types.SimpleNamespace(crc32=counted_crc32))
    probe = torch.randint(0, 16, (64, 128), dtype=torch.int32)
    for use in ("first", "later"):
        crc_bytes.clear()
        _AUDIT.clear()
        _AUDIT_ON.append(True)
        try:
            with _OpCounter() as counter:
                model = load(ckpt, MIXED, cache_dir)
        finally:
            _AUDIT_ON.clear()
        with _OpCounter() as control:  # the counter does see a repack
            torch._convert_weight_to_int4pack_for_cpu(probe, innerKTiles=2)
        assert model.load_report.cache_hit
        assert counter.repacks() == {} and control.repacks() == {"aten._convert_weight_to_int4pack_for_cpu": 1}
        opened = Counter(Path(p).name for _, p in _AUDIT if Path(p).parent == entry)
        assert opened[CF.CACHE_WEIGHTS] == 1 and opened[CF.CACHE_SIDECAR] == 1, (use, opened)
        raw = (entry / CF.CACHE_WEIGHTS).read_bytes()
        data = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # every tensor byte, each checked once on first use
        assert sum(crc_bytes) == (data if use == "first" else 0), use
    assert torch.equal(logits(model), logits(first))


def test_cpu_weights_are_views_of_the_entry_and_survive_its_removal(ckpt, cache_dir):
    """On CPU the cached weights are the page cache (no copy); pruning or replacing the entry while a run
    uses it changes nothing for that run: entries are unlinked or renamed, never written in place."""
    first = load(ckpt, "int4", cache_dir)
    expected = logits(first)
    model = load(ckpt, "int4", cache_dir)
    entry = Path(model.load_report.cache_path)
    w = model.model.layers[0].mlp.language_mlp.up_proj.weight._data._data
    mapped = [m for m in Path("/proc/self/maps").read_text().splitlines() if str(entry / CF.CACHE_WEIGHTS) in m]
    assert mapped and model.load_report.peak_host_anon_bytes - model.load_report.baseline_host_anon_bytes < 2**20
    assert w.data_ptr() % 64 == 0
    shutil.rmtree(entry)  # pruned ...
    entry.mkdir()  # ... and replaced by other bytes under the same name
    (entry / CF.CACHE_WEIGHTS).write_bytes(b"\0" * 4096)
    assert torch.equal(logits(model), expected)


def test_verify_cache_checks_every_checksum_again(ckpt, cache_dir, caplog):
    """After the first use only sizes and headers are checked; `verify_cache=True` (cogbatch quantize
    --verify) checks every byte again, and a damaged entry is rebuilt."""
    load(ckpt, "int4", cache_dir)
    entry = Path(load(ckpt, "int4", cache_dir).load_report.cache_path)  # first use: verified, recorded
    assert "on_first_use" in json.loads((entry / CF.CACHE_SIDECAR).read_text())["verified"]
    _flip_bytes(entry / CF.CACHE_WEIGHTS, INT4_DATA, offset=0)
    with caplog.at_level(logging.WARNING, logger="cogbatch"):
        checked = load(ckpt, "int4", cache_dir, verify_cache=True)
    assert "checksum mismatch" in caplog.text and not checked.load_report.cache_hit
    again = load(ckpt, "int4", cache_dir, verify_cache=True)
    assert again.load_report.cache_hit and again.load_report.verify_s > 0
    assert torch.equal(logits(again), logits(checked))

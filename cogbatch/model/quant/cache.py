"""The quantized-weights cache: what an entry's key covers, where entries live, validation, cleanup.

An entry is `<cache_dir>/quantized/<checkpoint>-<key[:16]>/` holding `model.safetensors` (every
weight in the layout its kernel consumes on this device class, see `flat` and `cachefile`) and
`quant.json` (key, rules, per-layer kernels and weight structure, versions, a checksum per tensor,
when it was verified). Reading an entry is mapping it and assigning its tensors: no repacking.

The key says what the bytes depend on, and nothing else. The checkpoint is identified by content,
cheaply: config and index bytes, each shard's name, size and safetensors header, and a 4 KiB sample
of every tensor's data (a fine-tune with unchanged shapes gets a new key); paths and mtimes are left
out, so `cogbatch quantize` on another machine of the same device class builds entries that hit
here. Then the rules, the dtype, the library versions without local build suffixes, the device class
(`cpu-avx512`, `cuda-sm90`: TinyGemm's packing differs per ISA and GPU arch) and the kernel of every
layer, so that an entry built for one kernel never feeds another.

Integrity: every load checks the sidecar, the file size and the safetensors header against the
sidecar's tensor list; the bytes' CRC-32 are checked when the entry is written and on its first use
(recorded in the sidecar), and on every load with `verify` (`cogbatch quantize --verify`). A damaged
entry is re-quantized rather than loaded: never a crash, never silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cogbatch.model.errors import CacheError
from cogbatch.model.quant.cachefile import CACHE_SIDECAR, host_name, parse_checksums
from cogbatch.model.quant.flat import leaf_names
from cogbatch.model.quant.plan import LayerQuant
from cogbatch.model.quant.spec import QuantConfig

log = logging.getLogger("cogbatch.model.quantize")

CACHE_FORMAT = 3  # 2: portable key, per-tensor checksums; 3: kernel layouts, device class in the key
SAMPLE_BYTES = 4096  # sampled from the middle of every checkpoint tensor for the key
_TEMP = re.compile(r"^\.(?P<entry>.+)\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")
_STALE_TEMP_S = 7 * 24 * 3600  # another host's temp dir: removed once this old (its writer is long gone)


def default_cache_dir() -> Path:
    """$COGBATCH_CACHE_DIR, else ~/.cache/cogbatch (pipeline.yaml's `cache_dir` is passed explicitly)."""
    return Path(os.environ.get("COGBATCH_CACHE_DIR") or "~/.cache/cogbatch").expanduser()


# --------------------------------------------------------------------------------------------
# the key


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _shard_identity(path: Path) -> dict[str, Any]:
    """Name, size, digest of the safetensors header and of a sample from the middle of every tensor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header_bytes = os.pread(fd, n, 8)
        header = json.loads(header_bytes)
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        samples = hashlib.blake2b(digest_size=16)
        for a, b in spans:
            start = max(a, (a + b) // 2 - SAMPLE_BYTES // 2)
            samples.update(os.pread(fd, min(SAMPLE_BYTES, b - start), 8 + n + start))
    finally:
        os.close(fd)
    return {"name": path.name, "size": size, "header": _digest(header_bytes), "samples": samples.hexdigest()}


def checkpoint_identity(ckpt: Path, files: list[Path]) -> dict[str, Any]:
    """The checkpoint as its content, the same on every machine with the same files (see the module doc).

    Costs two small reads per tensor (~5 MB for CogVLM2-19B), not a pass over the weights.
    """
    entries = []
    for name in ("config.json", "model.safetensors.index.json"):
        p = ckpt / name
        if p.is_file():
            data = p.read_bytes()
            entries.append({"name": name, "size": len(data), "digest": _digest(data)})
    entries += [_shard_identity(f) for f in files]
    return {"files": entries}


def _public_version(version: str) -> str:
    """'2.13.0+cu128' -> '2.13.0': CPU and CUDA builds of one release quantize alike."""
    return version.split("+", 1)[0]


def library_versions() -> dict[str, str]:
    """The versions whose code decides the cached bytes (read from package metadata, nothing imported)."""
    found = {"torch": torch.__version__, "optimum-quanto": _installed("optimum-quanto", "unknown"),
             "cogbatch": _installed("cogbatch", "0.0.0+unknown")}  # fmt: skip
    return {k: _public_version(v) for k, v in found.items()}


def _installed(name: str, missing: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # a source tree that was not installed
        return missing


def cache_key(
    ckpt: Path, files: list[Path], quant: QuantConfig, dtype: torch.dtype, target: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the fields it hashes): checkpoint identity, rules, dtype, library versions, format, and
    `target`: the device class and the kernel of every layer (`target_fields`)."""
    fields = {
        "format": CACHE_FORMAT,
        "checkpoint": checkpoint_identity(ckpt, files),
        "quantization": quant.key_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": library_versions(),
        "target": dict(target or {}),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest, fields


def target_fields(device_class: str, kernels: Mapping[str, str]) -> dict[str, Any]:
    """The layout part of the key: the device class, the kernels in use and a digest of every layer's kernel."""
    per_layer = json.dumps(sorted(kernels.items())).encode()
    return {"device": device_class, "kernels": sorted(set(kernels.values())), "layers": _digest(per_layer)}


# --------------------------------------------------------------------------------------------
# where entries live


def _slug(ckpt: Path) -> str:
    """A readable name for a checkpoint: its directory, or `owner--name` for a hub snapshot."""
    path = ckpt.resolve()
    name = path.parent.parent.name.removeprefix("models--") if path.parent.name == "snapshots" else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "model"


def cache_entry(cache_root: Path, ckpt: Path, key: str) -> Path:
    """The entry for `key`: an existing one under any checkpoint name (another machine may have named the
    checkpoint otherwise), else where a new one goes."""
    quantized = cache_root / "quantized"
    preferred = quantized / f"{_slug(ckpt)}-{key[:16]}"
    if not preferred.is_dir() and quantized.is_dir():
        for other in sorted(quantized.glob(f"*-{key[:16]}")):
            if other.is_dir() and not other.name.startswith("."):
                return other
    return preferred


def plan_json(plan: Mapping[str, LayerQuant], kernels: Mapping[str, str]) -> dict[str, Any]:
    """Per layer: dtype, group size and kernel (the sidecar's `layers`)."""
    return {
        name: {"weights": lp.qtype, "group_size": lp.group_size, "kernel": kernels[name]} for name, lp in plan.items()
    }


def read_cache_entry(entry: Path, key: str, layers: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar of a usable entry; raises CacheError naming what is wrong otherwise.

    Checks the format, the key, the per-layer dtype, group size and kernel against `layers`
    (`plan_json`), a weight structure for every quantized layer, and a checksum for every tensor.
    The weights file itself is checked against the sidecar by `cachefile.open_weights`.
    """
    side = entry / CACHE_SIDECAR
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"unreadable sidecar {side}: {e}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != CACHE_FORMAT:
        raise CacheError(f"{side}: unknown format {sidecar.get('format') if isinstance(sidecar, dict) else None!r}")
    if sidecar.get("key") != key:
        raise CacheError(f"{side}: key does not match this checkpoint, configuration, device and library versions")
    if sidecar.get("layers") != layers:
        raise CacheError(f"{side}: per-layer quantization or kernels differ from this load's")
    structure = sidecar.get("structure")
    tensors = sidecar.get("tensors")
    if not isinstance(structure, dict) or set(structure) != set(layers) or not isinstance(tensors, dict):
        raise CacheError(f"{side}: no weight structure for every quantized layer")
    missing = [n for s in structure.values() for n in leaf_names(s) if n not in tensors]
    if missing:
        raise CacheError(f"{side}: the structure names tensors the file does not list, e.g. {missing[0]}")
    parse_checksums(sidecar, list(tensors))
    return sidecar


# --------------------------------------------------------------------------------------------
# cleanup


def _source(sidecar: Mapping[str, Any]) -> str | None:
    """The checkpoint directory an entry was built from on this machine (format 1 kept it in the key)."""
    fields = sidecar.get("key_fields") or {}
    return sidecar.get("source") or (fields.get("checkpoint") or {}).get("path")


def _supersedes(ours: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether `other` is an outdated entry of our checkpoint with our rules and dtype.

    Outdated: another key (library versions, checkpoint content, cache format or kernels changed) for
    the same checkpoint (same content, or built from the same directory), the same rules and dtype and
    the same device class. Entries of other rules, dtypes or device classes are kept: another job may
    use them. Removing an entry a run has mapped is safe: its pages stay until the run unmaps them.
    """
    mine, theirs = ours["key_fields"], other.get("key_fields") or {}
    if other.get("key") == ours["key"]:
        return False
    if theirs.get("quantization") != mine["quantization"] or theirs.get("dtype") != mine["dtype"]:
        return False
    theirs_device = (theirs.get("target") or {}).get("device")
    if theirs_device is not None and theirs_device != (mine.get("target") or {}).get("device"):
        return False  # another device class's entry (a GPU run beside CPU runs): still in use
    return theirs.get("checkpoint") == mine["checkpoint"] or _source(other) == ours.get("source")


def _dead_temp_dir(path: Path) -> bool:
    """A writer's temp dir whose process is gone: its pid has exited on this host, or it is a week old."""
    m = _TEMP.match(path.name)
    if m is None:
        return False
    if m["host"] is not None and m["host"] != host_name():
        try:
            return time.time() - path.stat().st_mtime > _STALE_TEMP_S
        except OSError:
            return False
    try:
        os.kill(int(m["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive, someone else's
        return False
    return False


def prune_cache(entry: Path, sidecar: Mapping[str, Any]) -> list[Path]:
    """After `entry` was published: remove the entries it supersedes, crashed writers' temp dirs and trash.

    Returns what was removed. Best effort: anything that cannot be read or removed is left alone.
    """
    removed = []
    try:
        candidates = [p for p in entry.parent.iterdir() if p != entry and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        if path.name.startswith("."):
            stale = _dead_temp_dir(path) or ".old-" in path.name
        else:
            try:
                stale = _supersedes(sidecar, json.loads((path / CACHE_SIDECAR).read_text()))
            except (OSError, ValueError, AttributeError):
                stale = False
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    if removed:
        log.info("quantized-weights cache: removed %d outdated entries and temp dirs (%s)",
                 len(removed), ", ".join(p.name for p in removed))  # fmt: skip
    return removed

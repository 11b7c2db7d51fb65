"""The quantized-weights cache: what an entry's key covers, where entries live, validation, cleanup.

An entry is `<cache_dir>/quantized/<checkpoint>-<key[:16]>/` holding `model.safetensors` (quanto's
portable layout, see `cachefile`) and `quant.json` (key, rules, group sizes, quantization map,
versions, shapes and a checksum per tensor). The key is portable: `cogbatch quantize` on a bigger
machine builds entries that hit on another one holding the same checkpoint files under any path.
So it is computed from content, cheaply: config and index bytes, each shard's name, size and
safetensors header, and a 4 KiB sample of every tensor's data (a fine-tune with unchanged shapes
gets a new key); plus the rules, the dtype and the library versions without local build suffixes.
Paths and mtimes are left out. Every tensor's bytes are then verified on read (CRC-32), so a
damaged file is re-quantized rather than loaded: never a crash, never silently wrong weights.
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
from cogbatch.model.quant.cachefile import CACHE_SIDECAR, CACHE_WEIGHTS, ST_DTYPES, Layout, host_name, parse_checksums
from cogbatch.model.quant.plan import LayerQuant
from cogbatch.model.quant.spec import QuantConfig

log = logging.getLogger("cogbatch.model.quantize")

CACHE_FORMAT = 2  # 2: portable key, per-tensor checksums
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


def cache_key(ckpt: Path, files: list[Path], quant: QuantConfig, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the fields it hashes): checkpoint identity, rules, dtype, library versions, format."""
    fields = {
        "format": CACHE_FORMAT,
        "checkpoint": checkpoint_identity(ckpt, files),
        "quantization": quant.key_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest, fields


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


def plan_json(plan: Mapping[str, LayerQuant]) -> dict[str, Any]:
    return {name: {"weights": lp.qtype, "group_size": lp.group_size} for name, lp in plan.items()}


def read_cache_entry(entry: Path, key: str, layout: Layout, plan: Mapping[str, LayerQuant]) -> dict[str, Any]:
    """The sidecar of a usable entry; raises CacheError naming what is wrong otherwise.

    Checks the key, the file size, and every tensor's name, shape and dtype in the safetensors header
    against what this config must produce, and that every tensor has a checksum (verified while
    reading), so an edited, truncated, damaged or foreign entry is never loaded.
    """
    from safetensors import safe_open

    side = entry / CACHE_SIDECAR
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"unreadable sidecar {side}: {e}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != CACHE_FORMAT:
        raise CacheError(f"{side}: unknown format {sidecar.get('format') if isinstance(sidecar, dict) else None!r}")
    if sidecar.get("key") != key:
        raise CacheError(f"{side}: key does not match this checkpoint, configuration and library versions")
    if sidecar.get("layers") != plan_json(plan):
        raise CacheError(f"{side}: per-layer quantization differs from the rules")
    parse_checksums(sidecar, list(layout))
    weights = entry / CACHE_WEIGHTS
    try:
        size = weights.stat().st_size
    except OSError as e:
        raise CacheError(f"{weights}: {e}") from None
    if size != sidecar.get("files", {}).get(CACHE_WEIGHTS):
        raise CacheError(f"{weights}: {size} bytes, the sidecar says {sidecar.get('files', {}).get(CACHE_WEIGHTS)}")
    try:
        with safe_open(weights, framework="pt", device="cpu") as h:
            found = {}
            for name in h.keys():  # noqa: SIM118
                sl = h.get_slice(name)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CacheError(f"{weights}: unreadable ({type(e).__name__}: {e})") from None
    expected = {n: (s, ST_DTYPES[d]) for n, (s, d) in layout.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])[:3]
        raise CacheError(f"{weights}: tensors differ from the expected layout (missing {missing}, extra {extra}, "
                         f"wrong shape/dtype {wrong})")  # fmt: skip
    return sidecar


# --------------------------------------------------------------------------------------------
# cleanup


def _source(sidecar: Mapping[str, Any]) -> str | None:
    """The checkpoint directory an entry was built from on this machine (format 1 kept it in the key)."""
    fields = sidecar.get("key_fields") or {}
    return sidecar.get("source") or (fields.get("checkpoint") or {}).get("path")


def _supersedes(ours: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether `other` is an outdated entry of our checkpoint with our rules and dtype.

    Outdated: another key (library versions, checkpoint content or cache format changed) for the same
    checkpoint (same content, or built from the same directory) and the same rules and dtype. Entries
    of other rules or dtypes are kept: another job may use them.
    """
    mine, theirs = ours["key_fields"], other.get("key_fields") or {}
    if other.get("key") == ours["key"]:
        return False
    if theirs.get("quantization") != mine["quantization"] or theirs.get("dtype") != mine["dtype"]:
        return False
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

"""A cache entry's files: the weights (one safetensors file, CRC-32 per tensor) and the sidecar, written whole.

Writing happens once the model is built, from its own tensors, usually in a background thread
(`loader`): the bytes the model holds go to `.<entry>.tmp-<host>-<pid>-<tag>/`, each tensor's CRC-32
is taken from the very bytes written, the file is fsynced, mapped again and every CRC checked
("verified on write"), then the sidecar is written and the directory renamed to its final name. A
crash at any point leaves a temp dir (removed by the next write's cleanup) and never a half entry.

Layout: tensors whose size is a multiple of 64 bytes come first, in the model's order, after a
header padded to 64 bytes; so the big tensors sit 64-byte aligned in the file and a memory map of it
hands them to the kernels in place (`stfile.ALIGN`). The small rest (norms, biases) follows.

CRC-32 (zlib, ~4 GB/s here) detects every burst error up to 32 bits and is the checksum of zip and
PNG; this is about damaged files, not tampering.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cogbatch.model.errors import CacheError
from cogbatch.model.quant.stfile import ALIGN, ST_DTYPES, HeaderError, MappedFile

log = logging.getLogger("cogbatch.model.quantize")

CACHE_WEIGHTS = "model.safetensors"
CACHE_SIDECAR = "quant.json"


def host_name() -> str:
    """This host's name, safe in a file name."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in socket.gethostname()) or "host"


def temp_dir_name(entry: Path) -> str:
    """`.<entry>.tmp-<host>-<pid>-<tag>`: who writes it, so a cleanup can tell a crashed writer from a live one."""
    return f".{entry.name}.tmp-{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_order(tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """64-byte multiples first (they stay aligned), then the rest; each group in the given order."""
    aligned = [(n, t) for n, t in tensors if (t.numel() * t.element_size()) % ALIGN == 0]
    rest = [(n, t) for n, t in tensors if (t.numel() * t.element_size()) % ALIGN]
    return aligned + rest


def _as_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_entry(
    entry: Path,
    tensors: Sequence[tuple[str, torch.Tensor]],
    sidecar: Mapping[str, Any],
    *,
    key: str,
    checkpoint: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """Write and publish an entry; returns the sidecar as written. Raises OSError or CacheError (nothing
    is published then; the temp dir is removed).

    `checkpoint(stage)` is called between the stages ("weights", "verified", "published"); tests stop a
    writer there.
    """
    tmp = entry.parent / temp_dir_name(entry)
    try:
        tmp.mkdir(parents=True)
        ordered = file_order(tensors)
        header: dict[str, Any] = {"__metadata__": {"format": "pt", "cogbatch_key": key}}
        offset = 0
        for name, t in ordered:
            nbytes = t.numel() * t.element_size()
            header[name] = {
                "dtype": ST_DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % ALIGN)  # the data starts 64-byte aligned
        crcs = {}
        path = tmp / CACHE_WEIGHTS
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, memoryview(len(blob).to_bytes(8, "little") + blob))
            for name, t in ordered:
                view = _as_bytes(t)
                crcs[name] = zlib.crc32(view)
                _write_all(fd, view)
            os.fsync(fd)
        finally:
            os.close(fd)
        checkpoint("weights")
        verify(MappedFile(path), crcs, list(crcs))  # what reached the file is what the model holds
        checkpoint("verified")
        side = {
            **sidecar,
            "files": {CACHE_WEIGHTS: path.stat().st_size},
            "tensors": {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in ordered},
            "checksums": {n: f"crc32:{c:08x}" for n, c in crcs.items()},
            "verified": {"on_write": _now()},
        }
        _write_json(tmp / CACHE_SIDECAR, side)
        fsync_dir(tmp)
        if entry.exists():  # a stale or damaged entry under the same name: move it out of the way
            trash = entry.parent / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)  # a run mapping its files keeps their pages
        os.rename(tmp, entry)
        fsync_dir(entry.parent)
        checkpoint("published")
        return side
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def record_verified(entry: Path, sidecar: dict[str, Any]) -> bool:
    """Note in the sidecar that a load checked every checksum (written as a new file, then renamed over).

    False where the entry is read-only (a shared cache): later loads then check again.
    """
    side = {**sidecar, "verified": {**(sidecar.get("verified") or {}), "on_first_use": _now()}}
    tmp = entry / f".{CACHE_SIDECAR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_json(tmp, side)
        os.rename(tmp, entry / CACHE_SIDECAR)
    except OSError as e:
        log.debug("cannot record the verification of %s: %s", entry, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    sidecar.clear()
    sidecar.update(side)
    return True


def parse_checksums(sidecar: Mapping[str, Any], names: Sequence[str]) -> dict[str, int]:
    """The CRC-32 of every tensor in `names` from a sidecar; CacheError if any is missing or malformed."""
    found = sidecar.get("checksums")
    if not isinstance(found, dict):
        raise CacheError("the sidecar has no checksums")
    out = {}
    for name in names:
        value = found.get(name)
        if not (isinstance(value, str) and value.startswith("crc32:")):
            raise CacheError(f"the sidecar has no checksum for {name}")
        try:
            out[name] = int(value[6:], 16)
        except ValueError:
            raise CacheError(f"malformed checksum for {name}: {value!r}") from None
    return out


def open_weights(entry: Path, sidecar: Mapping[str, Any]) -> MappedFile:
    """The entry's weights, mapped, after the checks every load makes: the size the sidecar recorded, a
    well-formed header, and exactly the tensors (names, shapes, dtypes) the sidecar lists."""
    path = entry / CACHE_WEIGHTS
    expected_size = (sidecar.get("files") or {}).get(CACHE_WEIGHTS)
    try:
        size = path.stat().st_size
        if size != expected_size:
            raise CacheError(f"{path}: {size} bytes, the sidecar says {expected_size}")
        f = MappedFile(path)
    except (OSError, HeaderError) as e:
        raise CacheError(f"{path}: {e}") from None
    listed = sidecar.get("tensors")
    found = {n: [list(f.info(n)[0]), str(f.info(n)[1]).removeprefix("torch.")] for n in f.header}
    if found != listed:
        names = set(found) ^ set(listed or {})
        raise CacheError(f"{path}: tensors differ from the sidecar's list (e.g. {sorted(names)[:3]})")
    return f


def verify(f: MappedFile, checksums: Mapping[str, int], names: Sequence[str]) -> None:
    """Check every listed tensor's CRC-32 against the file's bytes; CacheError naming the first mismatch."""
    for name in names:
        if zlib.crc32(f.raw(name)) != checksums[name]:
            raise CacheError(f"{name}: checksum mismatch (the cache file is damaged)")

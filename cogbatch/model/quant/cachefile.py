"""One safetensors file written and read tensor by tensor, with a CRC-32 per tensor (the cache's bytes).

Writing: every name, shape and dtype is known before the first weight is quantized, so the header
(with all offsets) goes first and each tensor, or block of its rows, goes to its offset with
`pwrite` as the loader produces it; nothing is buffered. The entry appears under its final name (a
rename of its temp dir) only once every byte and the sidecar are written and fsynced.

Reading: the loader asks for tensors in file order, and each tensor's CRC-32 is checked against the
sidecar (in a second thread, while the loader repacks): flipped bits on disk become a `CacheError`
(and a re-quantization), never wrong weights. CRC-32 (zlib, ~2 GB/s) detects every burst error up to 32 bits and is the
checksum of zip and PNG; this is about damaged files, not tampering.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from cogbatch.model.errors import CacheError

log = logging.getLogger("cogbatch.model.quantize")

CACHE_WEIGHTS = "model.safetensors"
CACHE_SIDECAR = "quant.json"

ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}
Layout = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
Read = tuple[str, tuple[int, int] | None]  # a tensor, or rows [a, b) of it


def host_name() -> str:
    """This host's name, safe in a file name."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in socket.gethostname()) or "host"


def temp_dir_name(entry: Path) -> str:
    """`.<entry>.tmp-<host>-<pid>-<tag>`: who writes it, so a cleanup can tell a crashed writer from a live one."""
    return f".{entry.name}.tmp-{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class CacheWriter:
    """Writes one cache entry (weights file + sidecar) as the loader produces tensors, then publishes it.

    A failure is logged once and only disables the cache for this load.
    """

    def __init__(self, entry: Path, layout: Layout, key: str) -> None:
        self.entry = entry
        self.layout = layout
        self.key = key
        self.failed: str | None = None
        self.seconds = 0.0
        self._fd: int | None = None
        self._written = dict.fromkeys(layout, 0)  # bytes of each tensor written so far, in order
        self._crc = dict.fromkeys(layout, 0)
        self._tmp = entry.parent / temp_dir_name(entry)
        t0 = time.perf_counter()
        try:
            self._tmp.mkdir(parents=True)
            header: dict[str, Any] = {"__metadata__": {"format": "pt", "cogbatch_key": key}}
            offset = 0
            self._offsets = {}
            for name, (shape, dt) in layout.items():
                nbytes = math.prod(shape) * dt.itemsize
                span = [offset, offset + nbytes]
                header[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": span}
                self._offsets[name] = (offset, nbytes)
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            self._data_start = 8 + len(blob)
            self._fd = os.open(self._tmp / CACHE_WEIGHTS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, len(blob).to_bytes(8, "little") + blob, 0)
            os.ftruncate(self._fd, self._data_start + offset)
        except (OSError, KeyError) as e:
            self._fail(e)
        self.seconds += time.perf_counter() - t0

    @property
    def active(self) -> bool:
        return self.failed is None

    def write(self, name: str, tensor: torch.Tensor, first_row: int | None = None) -> None:
        """Write a whole tensor, or with `first_row` the next block of its rows (blocks come in order)."""
        if not self.active:
            return
        t0 = time.perf_counter()
        try:
            shape, dt = self.layout[name]
            whole = first_row is None
            if tensor.dtype != dt or (tuple(tensor.shape) != shape if whole else tuple(tensor.shape[1:]) != shape[1:]):
                raise CacheError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} does not fit the planned {shape} {dt}")
            offset, nbytes = self._offsets[name]
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            start = 0 if whole else first_row * (nbytes // shape[0])
            if start != self._written[name] or start + raw.nbytes > nbytes:
                raise CacheError(f"{name}: rows written out of order or past the end of the tensor")
            view = memoryview(raw)
            done = 0
            while done < raw.nbytes:
                done += os.pwrite(self._fd, view[done:], self._data_start + offset + start + done)
            self._crc[name] = zlib.crc32(view, self._crc[name])
            self._written[name] += raw.nbytes
        except (OSError, CacheError, KeyError) as e:
            self._fail(e)
        self.seconds += time.perf_counter() - t0

    def write_module(self, prefix: str, state: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.write(f"{prefix}.{name}", tensor)

    def commit(self, sidecar: dict[str, Any]) -> bool:
        """Publish the entry; returns False (entry discarded) if anything failed or is missing."""
        if not self.active:
            return False
        t0 = time.perf_counter()
        try:
            missing = sorted(n for n, done in self._written.items() if done != self._offsets[n][1])
            if missing:
                raise CacheError(f"{len(missing)} tensors were not (completely) written, e.g. {missing[0]}")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            sidecar = {
                **sidecar,
                "files": {CACHE_WEIGHTS: (self._tmp / CACHE_WEIGHTS).stat().st_size},
                "tensors": {n: [list(s), str(d).removeprefix("torch.")] for n, (s, d) in self.layout.items()},
                "checksums": {n: f"crc32:{c:08x}" for n, c in self._crc.items()},
            }
            side = self._tmp / CACHE_SIDECAR
            with open(side, "w") as f:
                json.dump(sidecar, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self._tmp)
            if self.entry.exists():  # a stale or damaged entry under the same name: move it out of the way
                trash = self.entry.parent / f".{self.entry.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(self._tmp, self.entry)
            fsync_dir(self.entry.parent)
        except (OSError, CacheError) as e:
            self._fail(e)
            return False
        finally:
            self.seconds += time.perf_counter() - t0
        return True

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _fail(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("could not write the quantized-weights cache %s (%s); going on without it", self.entry, error)
        self.abort()


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


class CacheReader:
    """Reads a validated cache file in file order; a second thread checks each tensor's CRC-32 meanwhile.

    `reads` lists, in file order, every tensor or block of rows the loader will ask for with `get`;
    each tensor must be covered completely, so that no byte goes unchecked. Whole tensors are read
    into fresh memory (they become parameters), row blocks into a ring of reused buffers (the loader
    repacks a block before asking for the next). One `pread` copy from the page cache into memory
    torch allocated: measured ~4x faster than safetensors' memory map plus a clone.

    The checksum runs beside the loader's repacking (zlib releases the GIL) and hides most of its
    ~0.15 s per 0.5 GB; a tensor may therefore be handed out before it is verified. A mismatch makes
    a later `get` raise, and `finish` (which the loader calls before returning the model) waits for
    the last check: a model built from damaged bytes is never returned.
    """

    _INLINE_BYTES = 1 << 20  # smaller whole tensors are checked at once: a task costs more than their CRC
    _RING = 8  # row-block buffers (~2 MB each): the reads may run this far ahead of the checks

    def __init__(self, path: Path, checksums: Mapping[str, int], reads: Sequence[Read]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, size, 8))
            header.pop("__metadata__", None)
            dtypes = {v: k for k, v in ST_DTYPES.items()}
            self._index = {n: (tuple(h["shape"]), dtypes[h["dtype"]], h["data_offsets"][0]) for n, h in header.items()}
            self._start = 8 + size
            self._reads = list(reads)
            self._check_coverage()
        except CacheError:
            os.close(self._fd)
            raise
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            os.close(self._fd)
            raise CacheError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        self._checksums = checksums
        self._next = 0
        self._crc: dict[str, int] = {}
        self._error: CacheError | None = None
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="cogbatch-cache-crc")
        self._last: Future | None = None
        self._buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(self._RING)]
        self._busy: list[Future | None] = [None] * self._RING  # the check still reading each buffer
        self._slot = 0

    def _rows(self, name: str) -> int:
        shape = self._index[name][0]
        return shape[0] if shape else 1

    def _check_coverage(self) -> None:
        """Every tensor read whole or by consecutive row blocks from row 0 to its end, in file order."""
        rows_done: dict[str, int] = {}
        for name, rows in self._reads:
            if name not in self._index:
                raise CacheError(f"{name}: not in the cache file")
            a, b = rows if rows is not None else (0, self._rows(name))
            if rows_done.get(name, 0) != a or b > self._rows(name):
                raise CacheError(f"{name}: planned reads do not cover it in order")
            rows_done[name] = b
        short = [n for n in self._index if rows_done.get(n) != self._rows(n)]
        if short:
            raise CacheError(f"planned reads leave {len(short)} tensors (partly) unchecked, e.g. {short[0]}")

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The next planned read, which must be (`name`, `rows`); CacheError on damage or a bad plan.

        A row block lives in a buffer that a later `get` of a row block overwrites (the loader repacks it first).
        """
        if self._error is not None:
            raise self._error
        if self._next >= len(self._reads) or self._reads[self._next] != (name, rows):
            raise CacheError(f"internal: asked for {name} {rows}, not the planned read {self._next}")
        self._next += 1
        slot = None
        if rows is not None:
            slot = self._slot = (self._slot + 1) % self._RING
            if self._busy[slot] is not None:
                self._busy[slot].result()  # its previous block is checked: the buffer may be refilled
        tensor, view = self._read(name, rows, slot)
        last = rows is None or rows[1] == self._rows(name)
        if rows is None and len(view) < self._INLINE_BYTES:
            self._verify(name, view, last)
        else:
            self._last = self._verifier.submit(self._verify, name, view, last)
            if slot is not None:
                self._busy[slot] = self._last
        if self._error is not None:
            raise self._error
        return tensor

    def finish(self) -> None:
        """Wait for the last checksum; CacheError if any tensor did not match."""
        if self._last is not None:
            self._last.result()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._verifier.shutdown(wait=True)
        os.close(self._fd)

    def _verify(self, name: str, view: memoryview, last: bool) -> None:
        crc = self._crc[name] = zlib.crc32(view, self._crc.get(name, 0))
        if last and crc != self._checksums[name] and self._error is None:
            self._error = CacheError(f"{name}: checksum mismatch (the cache file is damaged)")

    def _read(self, name: str, rows: tuple[int, int] | None, slot: int | None) -> tuple[torch.Tensor, memoryview]:
        """(tensor, its bytes): rows [a, b) of `name` (into buffer `slot`) or all of it, read with pread."""
        shape, dtype, offset = self._index[name]
        if rows is not None:
            offset += rows[0] * math.prod(shape[1:]) * dtype.itemsize
            shape = (rows[1] - rows[0], *shape[1:])
        nbytes = math.prod(shape) * dtype.itemsize
        if slot is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        else:
            if self._buffers[slot].numel() < nbytes:
                self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
            raw = self._buffers[slot][:nbytes]
        view = memoryview(raw.numpy())
        done = 0
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], self._start + offset + done)
            if got <= 0:
                raise CacheError(f"{name}: the cache file ends early")
            done += got
        return raw.view(dtype).view(shape), view

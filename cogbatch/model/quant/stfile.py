"""A safetensors file as a memory map: its header checked, its tensors as zero-copy views.

Both sides of a quantized load read this way: the checkpoint's shards while quantizing (the worker
threads cast or quantize straight from the page cache, with no copy and no lock held), and a cache
entry, whose tensors then stay views of the file (on CPU a cached load is the page cache).

The map is private (copy-on-write, `MAP_PRIVATE`): nothing written to a tensor reaches the file, and
a file replaced or unlinked under a running model leaves its pages in place. Only an overwrite in
place would change them, and cogbatch never writes a file in place (cache entries are written under a
temp name and renamed; `cachefile`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
ALIGN = 64  # tensors at this alignment are used in place; others are copied (some kernels need it)


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file (short, bad header, offsets out of order)."""


def read_header(fd: int, size: int) -> tuple[dict[str, Any], int]:
    """(header without `__metadata__`, offset of the data) of an open safetensors file of `size` bytes.

    Checks what safetensors checks: a JSON header that fits, known dtypes, and tensor bytes that tile
    the data area exactly (no gap, no overlap, nothing past the end).
    """
    if size < 8:
        raise HeaderError(f"{size} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > size - 8:
        raise HeaderError(f"header of {n} bytes in a file of {size}")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except ValueError as e:
        raise HeaderError(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + n
    spans = []
    for name, h in header.items():
        try:
            dtype, shape, (a, b) = TORCH_DTYPES[h["dtype"]], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"{name}: malformed header entry") from None
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if b - a != nbytes:
            raise HeaderError(f"{name}: {b - a} bytes for shape {list(shape)} {h['dtype']}")
        spans.append((a, b))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise HeaderError("tensor data does not tile the file (a gap or an overlap)")
        end = b
    if start + end != size:
        raise HeaderError(f"{size} bytes, the header describes {start + end}")
    return header, start


class MappedFile:
    """One safetensors file, mapped privately; `tensor(name)` views it, `raw(name)` gives its bytes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            self.header, self.start = read_header(fd, self.size)
            # ACCESS_COPY: writable copy-on-write pages, so torch.frombuffer needs no read-only warning
            self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_COPY) if self.size else None
        finally:
            os.close(fd)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8) if self._map is not None else None

    def names(self) -> list[str]:
        """Tensor names in file order (by offset)."""
        return sorted(self.header, key=lambda n: self.header[n]["data_offsets"][0])

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype, int, int]:
        """(shape, dtype, first byte, end byte) of a tensor, as offsets into the file."""
        h = self.header[name]
        a, b = h["data_offsets"]
        return tuple(h["shape"]), TORCH_DTYPES[h["dtype"]], self.start + a, self.start + b

    def tensor(self, name: str, align: int = ALIGN) -> torch.Tensor:
        """A view of the tensor in the map (no copy), or a copy when its address is not `align`-aligned."""
        shape, dtype, a, b = self.info(name)
        raw = self._bytes[a:b]
        if raw.data_ptr() % align:
            raw = raw.clone()
        return raw.view(dtype).view(shape)

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes in the map, for checksums."""
        _, _, a, b = self.info(name)
        return memoryview(self._map)[a:b]

    def will_need(self, name: str | None = None) -> None:
        """Ask the kernel to read a tensor's pages (all of them: None) ahead, without waiting for them."""
        if self._map is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        a, b = (0, self.size) if name is None else self.info(name)[2:]
        page = mmap.PAGESIZE
        start = a // page * page
        if b > start:
            with contextlib.suppress(OSError):  # advice only
                self._map.madvise(mmap.MADV_WILLNEED, start, b - start)

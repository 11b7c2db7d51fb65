"""The input's images as entries: identified by the sha256 of their bytes, with the values prompts can use.

Images are identified by content, so a renamed file is not redone and an edited one is. An image that
cannot be read becomes an entry with an error (and a stable id from its label): an error row, never a
crash. Every entry carries `{filename}`, `{stem}` and `{folder}`, whatever the input.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogbatch.inputs.hashes import HashCache
    from cogbatch.job.config import InputConfig

# Placeholders every request can use, whatever the input.
BUILTIN_PLACEHOLDERS = ("filename", "stem", "folder")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unreadable_id(label: str) -> str:
    """A stable id for an input that has no bytes to hash (missing file, null path)."""
    return sha256_hex(b"unreadable\0" + label.encode("utf-8", "surrogateescape"))


@dataclass
class ImageEntry:
    image_id: str
    path: str  # what the result row shows: the file path, or a manifest row label
    file: Path | None = None  # where to read the bytes from, or None
    row: int | None = None  # manifest row holding inline bytes
    values: dict[str, Any] = field(default_factory=dict)  # placeholder values: filename, stem, folder, columns
    error: str | None = None  # known unreadable before decoding


def scan_folder(inp: InputConfig) -> list[Path]:
    """Image files under the folder, sorted so that the order of work is deterministic."""
    exts = {"." + e for e in inp.extensions}
    found: list[Path] = []
    if inp.recursive:
        for root, dirs, files in os.walk(inp.folder):
            dirs.sort()
            found += [Path(root) / f for f in files if Path(f).suffix.lower() in exts]
    else:
        found = [p for p in inp.folder.iterdir() if p.suffix.lower() in exts and not p.is_dir()]
    return sorted(found)


def builtin_values(label: str | PurePath) -> dict[str, str]:
    """`{filename}`, `{stem}`, `{folder}` of an image's path or label, so every request can fill them.

    Inline-bytes rows and rows without a path have only a label (`id_column` value, `manifest.parquet#7`):
    its parts stand in for the file's, so a prompt using them never fails on such rows.
    """
    path = PurePath(label)
    return {"filename": path.name, "stem": path.stem or path.name, "folder": path.parent.name}


def file_entry(path: Path, display: str, cache: HashCache, values: dict[str, Any]) -> ImageEntry:
    values = {**builtin_values(path), **values}
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "is a directory")
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
            raise OSError(0, "not a regular file")
        return ImageEntry(cache.image_id(path), display, file=path, values=values)
    except OSError as e:
        reason = {2: "file not found", 13: "permission denied", 21: "is a directory", 40: "symlink loop"}.get(
            e.errno, e.strerror or type(e).__name__
        )
        return ImageEntry(unreadable_id(display), display, file=path, values=values, error=reason)


def never_stop() -> None:
    return None


def folder_entries(inp: InputConfig, cache: HashCache, check: Callable[[], None] = never_stop) -> list[ImageEntry]:
    entries = []
    for p in scan_folder(inp):
        check()
        entries.append(file_entry(p, str(p), cache, {}))
    return entries

"""Atomic file writes: every file cogbatch writes is either absent or complete, never half written.

Temp name beside the target, fsync, rename over the target, fsync the directory (datatrove's completions,
img2dataset's stats written last): a crash or a power cut leaves the old file or the new one. The temp
file is flocked while written, so a cleanup in another process (`store.prepare_output`) can tell a live
writer's temp file from a dead one's. Temp names end in random hex, never in `.parquet`, so no glob of
complete files ever picks one up.

The model package keeps its own small fsync of a directory: it is the leaf and imports nothing from here.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

TEMP_PATTERN = re.compile(r"^\.tmp-.+\.[0-9a-f]{32}$")


def temp_path(target: Path) -> Path:
    """`.tmp-<name>.<32 hex>` beside `target`."""
    return target.with_name(f".tmp-{target.name}.{uuid.uuid4().hex}")


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in `directory` durable; without it a power cut can undo them."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    target: Path,
    mode: str = "wb",
    *,
    before_rename: Callable[[], None] | None = None,
    commit: Callable[[Path], bool] | None = None,
    durable: bool = True,
    **open_kw: Any,
) -> Iterator[IO[Any]]:
    """Write `target` through the file this yields; it replaces `target` when the block ends without error.

    `before_rename` is the caller's last word before the file becomes visible (raising drops it);
    `commit(temp)` may look at the finished temp file and return False to drop it instead of renaming
    (an export that finds the same content already there). The temp file is removed whatever happens.
    `durable=False` skips the fsyncs, for caches whose lost entries are simply made again (thumbnails):
    the rename still guarantees that no reader ever sees half a file.
    """
    target = Path(target)
    temp = temp_path(target)
    created = renamed = False
    try:
        with open(temp, mode.replace("w", "x"), **open_kw) as f:
            created = True
            if fcntl is not None:  # held until the rename: a cleanup never takes a live writer's file
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
            if before_rename is not None:
                before_rename()
            if commit is None or commit(temp):
                os.replace(temp, target)
                renamed = True
        if renamed and durable:
            fsync_dir(target.parent)
    finally:
        if created:  # gone once renamed; never created when open failed
            with contextlib.suppress(OSError):  # never mask the error being raised (EROFS on unlink...)
                temp.unlink()


def publish(written: Path, target: Path) -> None:
    """Give a finished file that another library wrote (safetensors, pyarrow) its final name: fsync, rename,
    fsync the directory. `written` should be a `temp_path(target)`, so that it is never taken for complete."""
    with open(written, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(written, target)
    fsync_dir(Path(target).parent)


def atomic_write(target: Path, data: bytes | str, **kw: Any) -> None:
    """`target` holds exactly `data` (text as UTF-8) once this returns, and the old content until then."""
    with atomic_file(target, "wb", **kw) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def made_dirs(directory: Path) -> Iterator[Path]:
    """`directory`, created with its missing parents; if the block raises, what it created and left empty goes.

    A command that fails must not leave empty folders behind (`quantize --out new/dir` with a model that
    cannot be loaded). Files are never removed: only empty directories at or below those made here.
    """
    made = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    directory.mkdir(parents=True, exist_ok=True)
    try:
        yield directory
    except BaseException:
        if made:
            for root, _, _ in os.walk(made[-1], topdown=False):
                with contextlib.suppress(OSError):  # not empty: something in it was written
                    os.rmdir(root)
        raise

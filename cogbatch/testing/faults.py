"""Fault injection for crash tests: one hook, `point(name)`, called where a crash would matter.

When the environment variable `COGBATCH_FAULT` names a point, the process SIGKILLs itself there, as a
power cut or the out-of-memory killer would stop it. Never set it outside tests. Its value is one or
more points separated by commas, each written

    NAME          die every time the process reaches NAME
    NAME@VALUE    die there when VALUE is among the subjects the caller names (an image's file name)
    NAME!PATH     die there once: the first process to create the file PATH dies, the others go on

Points:
    part-temp-written        a result part fsynced under its temp name, not yet renamed (store)
    part-renamed             a result part renamed into place (store)
    compact-journal-written  a compaction's journal in place, no new part yet (store)
    compact-new-written      a compaction's new parts in place, the old ones not yet deleted (store)
    ray-part-written         a Ray actor has written a batch's part (an actor killed after its work)
    ray-batch                a Ray actor is about to generate a batch; subjects: its images' file names
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

ENV = "COGBATCH_FAULT"
POINTS = (
    "part-temp-written",
    "part-renamed",
    "compact-journal-written",
    "compact-new-written",
    "ray-part-written",
    "ray-batch",
)


def point(name: str, subjects: Iterable[str] = ()) -> None:
    """SIGKILL this process if COGBATCH_FAULT arms `name` (see the module docstring); else do nothing."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    armed = os.environ.get(ENV)
    if not armed:
        return
    for spec in armed.split(","):
        if spec == name or (spec.startswith(name + "@") and spec[len(name) + 1 :] in set(subjects)):
            _die()
        if spec.startswith(name + "!") and _first_to_create(spec[len(name) + 1 :]):
            _die()


def _first_to_create(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

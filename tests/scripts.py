"""The benchmark scripts as modules, for tests of their pieces (`scripts/` is not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def import_script(name: str) -> ModuleType:
    """`scripts/<name>.py`, imported once; `scripts/` is on sys.path only while it imports."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))

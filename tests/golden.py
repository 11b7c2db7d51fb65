"""Where the reference fixtures live, resolved at collection time so tests can be parametrized by them."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def golden_root() -> Path:
    return Path(os.environ.get("COGBATCH_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_configs() -> list[Path]:
    """Every reference checkpoint with cases (`cogvlm1/dev`, `cogvlm2/dev`, and any held-back ones)."""
    return sorted(p.parent for p in golden_root().glob("cogvlm*/*/cases.safetensors"))

"""The planner's figures beside the fake-CUDA dry run's, for `cogbatch plan --verbose`.

A plan's peak is a formula (`planning.memory`); what backs it is the dry run (`cogbatch.dryrun`), which
runs the real code at full size on fake CUDA tensors with a model of CUDA's caching allocator.
`scripts/bench_planner.py --write` traces the official models (both generations, sm86 bf16 and sm75
fp16, resident and phase-swapped, 1/2/4/8 slots) on a card exactly the size of each plan, and writes
`dryrun_grid.json` beside this module; `cogbatch plan --verbose` quotes the row nearest to its plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GRID = Path(__file__).with_name("dryrun_grid.json")
# Per generation, the grid's model name and the shapes its rows stand for: the official checkpoints'
# (hidden size, layers, KV heads, vocabulary; their configs ship with cogbatch).
_OFFICIAL = {
    "cogvlm1": ("cogvlm", (4096, 32, 32, 32000)),
    "cogvlm2": ("cogvlm2", (4096, 32, 8, 128256)),
}


def device_class(dtype_name: str, capability: tuple[int, int] | None) -> str | None:
    """The grid's device column for a plan's dtype and card: bf16 from sm80 on, fp16 before; else None."""
    if dtype_name == "bfloat16" and (capability is None or capability >= (8, 0)):
        return "8.6-bf16"
    if dtype_name == "float16" and capability is not None and capability < (8, 0):
        return "7.5-fp16"
    return None


def dryrun_reference(
    cfg: Any, dtype_name: str, capability: tuple[int, int] | None, mode: str, slots: int
) -> dict | None:
    """The grid row for this model, device class and mode with the most slots up to `slots`, or None.

    None for a model of other shapes (a tiny or a fine-tuned variant of another size), a dtype the grid
    did not trace, or no grid file.
    """
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size)
    model, official = _OFFICIAL.get(cfg.generation, (None, None))
    device = device_class(dtype_name, capability)
    if official != shape or device is None or not GRID.is_file():
        return None
    rows = [
        r for r in json.loads(GRID.read_text())
        if (r["model"], r["device"], r["mode"]) == (model, device, mode) and "error" not in r
    ]  # fmt: skip
    below = [r for r in rows if r["slots"] <= slots]
    if not below:
        return None
    return max(below, key=lambda r: r["slots"])

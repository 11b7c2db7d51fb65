"""Quantization of a CogVLM checkpoint with optimum-quanto: settings, per-layer plan, the streaming loader,
the quantized-weights cache and the load report.

The settings (`QuantConfig`, `QuantRule`) are torch-free and imported at once; everything else is
imported on first use, so the job reader and `cogbatch plan` never pay for torch or quanto here.
"""

from __future__ import annotations

import importlib
from typing import Any

from cogbatch.model.quant.spec import QuantConfig, QuantRule

# name -> the module of this package that defines it (imported when the name is first used)
_LAZY = {
    "LayerQuant": "plan",
    "plan_layers": "plan",
    "predict_weight_bytes": "plan",
    "describe_int4_kernel": "plan",
    "load_quantized": "loader",
    "LoadReport": "report",
    "DequantQLinear": "linear",
    "largest_dense_copy": "linear",
    "move_module": "linear",
    "default_cache_dir": "cache",
}

__all__ = ["QuantConfig", "QuantRule", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)

"""quanto weights as named plain tensors and back, in the layout their kernel consumes: what a cache entry holds.

A quantized weight is a tree of tensor subclasses (TinyGemm: weight -> packed data + scale-and-shift;
portable int4: weight -> PackedTensor + scale + shift; ...), each with `__tensor_flatten__`. The
cache stores the leaves as they are on the device, so that reading an entry is assigning tensors:
no repacking (TinyGemm's int4 packing, AWQ's reordering) happens on a cached load. The tree's shape
(classes and their metadata) goes to the sidecar as JSON, and only classes listed here are rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.packed import PackedTensor
from optimum.quanto.tensor.weights.awq import AWQWeightQBitsTensor
from optimum.quanto.tensor.weights.awq.packed import AWQPackedTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

from cogbatch.model.errors import CacheError

_CLASSES = {
    cls.__name__: cls
    for cls in (
        TinyGemmWeightQBitsTensor,
        TinyGemmPackedTensor,
        AWQWeightQBitsTensor,
        AWQPackedTensor,
        WeightQBitsTensor,
        PackedTensor,
        WeightQBytesTensor,
    )
}


def flatten(t: torch.Tensor, prefix: str) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """(structure, [(name, plain tensor)]): `structure` is JSON, leaves are named `prefix.<inner path>`."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return prefix, [(prefix, t.data if isinstance(t, torch.nn.Parameter) else t)]
    cls = type(t)
    if cls.__name__ not in _CLASSES:
        raise CacheError(f"{prefix}: cannot cache a {cls.__name__}")
    names, meta = t.__tensor_flatten__()
    inner, leaves = {}, []
    for n in names:
        inner[n], sub = flatten(getattr(t, n), f"{prefix}.{n}")
        leaves += sub
    structure = {
        "class": cls.__name__,
        "meta": meta,
        "size": list(t.size()),
        "stride": list(t.stride()),
        "inner": inner,
    }
    return structure, leaves


def unflatten(structure: Any, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The weight `flatten` described, its leaves from `get(name)`; CacheError for a malformed structure."""
    if isinstance(structure, str):
        return get(structure)
    try:
        cls = _CLASSES[structure["class"]]
        inner = {n: unflatten(s, get) for n, s in structure["inner"].items()}
        return cls.__tensor_unflatten__(inner, structure["meta"], tuple(structure["size"]), tuple(structure["stride"]))
    except CacheError:
        raise
    except Exception as e:  # a hand-edited or foreign sidecar: quanto asserts, KeyError, ValueError ...
        raise CacheError(f"malformed weight structure in the sidecar ({type(e).__name__}: {e})") from None


def leaf_names(structure: Any) -> list[str]:
    """Names of the plain tensors a structure refers to."""
    if isinstance(structure, str):
        return [structure]
    return [n for s in structure.get("inner", {}).values() for n in leaf_names(s)]


def kernel_of(weight: torch.Tensor, packed_for: torch.device | None = None) -> str:
    """The kernel a built weight runs (the names of `plan.layer_kernel`).

    `packed_for`: the device whose layout the weight holds, when it may differ from where it sits (a
    weight parked in host memory keeps the device's TinyGemm packing); by default, its own device.
    """
    if isinstance(weight, TinyGemmWeightQBitsTensor):
        return f"tinygemm-{(packed_for or weight.device).type}"
    if isinstance(weight, AWQWeightQBitsTensor):
        return "awq"
    if type(weight) is WeightQBitsTensor:
        return "fallback"
    if isinstance(weight, WeightQBytesTensor):
        return "int8"
    return type(weight).__name__

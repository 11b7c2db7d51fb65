"""Values for the project's data-dependent Python, on tensors that have none.

Fake tensors carry shapes, not values, yet the model code reads values where it must: `bool(mask.all())`,
`int(lengths.max())`, `x[mask] = feats`, `ids.tolist()`. Fake mode refuses those
(`DataDependentOutputException`, `DynamicOutputShapeException` for `nonzero`). The oracle gives every
int64 and bool fake tensor of up to 4M elements a real CPU *shadow* with its values, computed by
running each operator on the shadows of its inputs: ids, positions, lengths and masks follow the
program exactly. The shadow is an attribute of the fake tensor object, so it dies with it; views get
views of their base's shadow, so in-place updates reach the base.

Integers computed from float data (the argmax of fake logits) are unknowable: they are zeros, so
generation never meets a stop token and runs to `max_new_tokens`. Other integer dtypes (packed int4
weights in uint8/int32) never steer Python and get no shadow: shadowing them would cost real memory
the size of the weights.

Disabled (while the loader runs), the oracle keeps no shadows. The loader's only questions are then
the quantizer's checks of each block of weights (`isfinite(..).all()`, `(scale == 0).any()`): the
answers are those of ordinary weights, a reduction by `all` true and one by `any` false (`assume`),
so that the fast path every real checkpoint takes is the one traced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten
_ATTR = "_cogbatch_dryrun_value"
_ASSUMED = "_cogbatch_dryrun_assumed"
SHADOWED = frozenset({torch.int64, torch.bool})
LIMIT = 1 << 22  # elements: the ids, masks and positions of a batch; the repetition set (slots x vocab)
_UNINITIALISED = frozenset({aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                            aten.empty_strided.default, aten.new_empty_strided.default})  # fmt: skip
_BOOL_INDEX_OPS = frozenset({aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                             aten._index_put_impl_.default, aten._unsafe_index.Tensor})  # fmt: skip
_CPU = torch.device("cpu")


def _eligible(t: Any) -> bool:
    return isinstance(t, FakeTensor) and t.dtype in SHADOWED and t.numel() <= LIMIT


def _mutated_args(func: Any) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write)


class ValueOracle:
    """Shadows of int64/bool fake tensors; answers `item`, `nonzero`, boolean-mask indexing and `tolist`."""

    def __init__(self, track: Callable[[torch.Tensor], None] = lambda t: None) -> None:
        self.track = track  # tensors the oracle creates on the device are device memory too (nonzero's result)
        self.enabled = True
        self.stats: Counter[str] = Counter()
        self._mutated: dict[Any, tuple[int, ...]] = {}

    # -- values ---------------------------------------------------------------------------------

    def value(self, t: Any) -> Any:
        """The real values of `t`: its shadow, `t` itself if real, zeros if unknown."""
        if not isinstance(t, FakeTensor):
            return t
        s = t.__dict__.get(_ATTR)
        if s is None:
            with _disable_current_modes():
                s = torch.zeros(t.shape, dtype=t.dtype)
            self.stats["unknown_values"] += 1
            if _eligible(t):
                setattr(t, _ATTR, s)
        return s

    def _fake_with(self, real: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = torch.empty(real.shape, dtype=real.dtype, device=device)  # below our mode: a fake tensor
        self.track(out)
        setattr(out, _ATTR, real)
        return out

    def tolist(self, t: torch.Tensor) -> Any:
        self.stats["tolist"] += 1
        with _disable_current_modes():
            return self.value(t).tolist()

    # -- operators ------------------------------------------------------------------------------

    def answer(self, func: Any, args: tuple) -> tuple[bool, Any]:
        """(True, result) for the operators whose result is a value: `item`, `bool(t)`, `nonzero`."""
        if func is aten._local_scalar_dense.default or func is aten.is_nonzero.default:
            self.stats["item"] += 1
            with _disable_current_modes():
                v = self.value(args[0]).item()
            return True, (bool(v) if func is aten.is_nonzero.default else v)
        if func is aten.nonzero.default:
            self.stats["nonzero"] += 1
            with _disable_current_modes():
                real = self.value(args[0]).nonzero()
            return True, self._fake_with(real, args[0].device)
        return False, None

    def assume(self, func: Any, args: tuple) -> tuple[bool, Any]:
        """(True, answer) for the truth of an `all`/`any` reduction while disabled: that of ordinary weights."""
        if func is aten._local_scalar_dense.default or func is aten.is_nonzero.default:
            v = getattr(args[0], _ASSUMED, None)
            if v is not None:
                self.stats["assumed"] += 1
                return True, v
        return False, None

    def tag(self, func: Any, out: Any) -> None:
        """Mark the result of an `all` (true) or `any` (false) reduction for `assume`."""
        packet = getattr(func, "overloadpacket", None)
        if isinstance(out, FakeTensor) and out.dtype == torch.bool and (packet is aten.all or packet is aten.any):
            setattr(out, _ASSUMED, packet is aten.all)

    def rewrite(self, func: Any, args: tuple) -> tuple:
        """Boolean-mask indices replaced by the integer indices of their True entries (what CUDA computes)."""
        if func not in _BOOL_INDEX_OPS or not any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            return args
        indices: list[Any] = []
        for idx in args[1]:
            if isinstance(idx, torch.Tensor) and idx.dtype in (torch.bool, torch.uint8):
                self.stats["mask_index"] += 1
                with _disable_current_modes():
                    reals = self.value(idx).bool().nonzero(as_tuple=True)
                indices += [self._fake_with(n, idx.device) for n in reals]
            else:
                indices.append(idx)
        return (args[0], indices, *args[2:])

    def propagate(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Give the operator's int64/bool results (and mutated arguments) their values."""
        mutated_idx = self._mutated.get(func)
        if mutated_idx is None:
            mutated_idx = self._mutated[func] = _mutated_args(func)
        mutated = [args[i] for i in mutated_idx if i < len(args) and _eligible(args[i])]
        if "out" in kwargs and _eligible(kwargs["out"]):
            mutated.append(kwargs["out"])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        fresh = [t for t in outs if _eligible(t) and not any(t is m for m in mutated)]
        if not fresh and not mutated:
            return
        flat = _tensors((args, kwargs))
        if func in _UNINITIALISED or any(isinstance(x, FakeTensor) and not _integral(x) for x in flat):
            # Uninitialised memory, or integers computed from float data (argmax of logits): zeros.
            # A mutated tensor keeps its values.
            with _disable_current_modes():
                for t in fresh:
                    setattr(t, _ATTR, torch.zeros(t.shape, dtype=t.dtype))
            self.stats["zeros"] += 1
            return
        s_args = _substitute(args, self.value)
        s_kwargs = {k: (_CPU if k == "device" and v is not None else _substitute(v, self.value))
                    for k, v in kwargs.items()}  # fmt: skip
        if s_kwargs.get("pin_memory"):
            s_kwargs["pin_memory"] = False
        try:
            with _disable_current_modes():
                s_out = func(*s_args, **s_kwargs)
        except Exception as e:  # a shadow that cannot be computed: zeros, counted for the report
            self.stats[f"failed:{func.__name__}:{type(e).__name__}"] += 1
            with _disable_current_modes():
                for t in fresh:
                    setattr(t, _ATTR, torch.zeros(t.shape, dtype=t.dtype))
            return
        s_outs = s_out if isinstance(s_out, (tuple, list)) else (s_out,)
        if len(s_outs) == len(outs):
            for t, s in zip(outs, s_outs, strict=True):
                if any(t is f for f in fresh) and isinstance(s, torch.Tensor):
                    setattr(t, _ATTR, s)
        self.stats["shadow_ops"] += 1


def _integral(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []


def _substitute(tree: Any, value: Callable[[Any], Any]) -> Any:
    if isinstance(tree, torch.Tensor):
        return value(tree)
    if isinstance(tree, torch.device):
        return _CPU
    if isinstance(tree, tuple):
        return tuple(_substitute(x, value) for x in tree)
    if isinstance(tree, list):
        return [_substitute(x, value) for x in tree]
    return tree

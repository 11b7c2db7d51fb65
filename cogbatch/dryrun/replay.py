"""Replaying the loader's work for layers of a shape already traced: the load at full size in seconds.

The work a quantizing builder does for one Linear depends only on the weight's shape and rule, so the
first builder of each (shape, rule, kernel, dtype, device) is traced and the others replay its sequence
of allocations into the allocator model, their tensors rebuilt with the traced structure
(`trace_every_layer` traces them all). Byte-identical to tracing every layer (a CI test checks it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cogbatch.dryrun.memtrace import storage_key
from cogbatch.dryrun.session import FakeCudaSession


class LoaderMemo:
    """Build the first Linear of each (shape, rule, kernel) for real (fake tensors); replay it for the others.

    A builder's work depends only on the weight's shape, its rule, its kernel, the dtype and the
    device, so a traced builder's allocation sequence and kernel calls are those of every builder like
    it. Called as the stream's `linear_builder`: the first builder of a kind is wrapped so that its
    allocations, from its buffers to its finished weight, are captured (`_TracedBuilder`); the others
    read nothing (`_ReplayedBuilder`): at `finish` the sequence is replayed into the allocator (same
    transient peaks, same blocks), the counted operators are added, and a weight of the same
    classes, shapes and strides is returned, its storages taking the blocks the replay left live.
    CogVLM2 has 577 quantized Linears of about 10 shapes.
    """

    def __init__(self, session: FakeCudaSession, original: Callable[..., Any], every_layer: bool) -> None:
        self.session = session
        self.original = original
        self.every_layer = every_layer
        self.templates: dict[tuple[Any, ...], tuple[tuple, list[tuple[int, int]], Counter[str]]] = {}
        self.traced = self.replayed = 0

    def __call__(self, lp: Any, kernel: str, shape: tuple[int, int], dtype: torch.dtype, device: Any) -> Any:
        key = (tuple(shape), lp.qtype, lp.group_size, kernel, dtype, torch.device(device).type)
        template = None if self.every_layer else self.templates.get(key)
        if template is None:
            self.traced += 1
            if self.every_layer:
                return self.original(lp, kernel, shape, dtype, device)
            return _TracedBuilder(self, key, lambda: self.original(lp, kernel, shape, dtype, device))
        self.replayed += 1
        return _ReplayedBuilder(self.session, *template)

    def clear(self) -> None:
        """Drop the templates (the load is over)."""
        self.templates.clear()


class _TracedBuilder:
    """A real builder whose device allocations and counted operators, until `finish`, become a template."""

    def __init__(self, memo: LoaderMemo, key: tuple[Any, ...], make: Callable[[], Any]) -> None:
        self.memo, self.key = memo, key
        s = memo.session
        self._counts = Counter(s.mode.counts)
        self._capture = s.trace.capture()
        self._script = self._capture.__enter__()
        try:
            self.inner = make()
        except BaseException:
            self._capture.__exit__(None, None, None)
            raise

    def blocks(self) -> list[tuple[int, int]]:
        return self.inner.blocks()

    def fill(self, *args: Any) -> None:
        self.inner.fill(*args)

    def finish(self) -> torch.Tensor:
        try:
            weight = self.inner.finish()
        finally:
            self._capture.__exit__(None, None, None)
        s = self.memo.session
        self.memo.templates[self.key] = (_structure(weight), self._script, s.mode.counts - self._counts)
        return weight


class _ReplayedBuilder:
    """A builder with no blocks whose `finish` replays a template: its allocations, its counts, its structure."""

    def __init__(self, session: FakeCudaSession, weight: tuple, script: list[tuple[int, int]], counts: Counter):
        self.session, self.weight, self.script, self.counts = session, weight, script, counts

    def blocks(self) -> list[tuple[int, int]]:
        return []

    def finish(self) -> torch.Tensor:
        s = self.session
        s.trace.replay(self.script)
        s.mode.counts.update(self.counts)
        try:
            return _rebuild(self.weight, {})
        finally:
            s.trace.release_unadopted()


def _structure(t: torch.Tensor, storages: dict[int, int] | None = None) -> tuple:
    """What `_rebuild` needs to make a tensor like `t`, holding none of its memory: a template must not keep
    a weight's device storage alive once the loader has parked that weight in host memory."""
    storages = {} if storages is None else storages
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        inner = {n: _structure(getattr(t, n), storages) for n in names}
        awq = (t._packing, t._reorder) if type(t).__name__ == "AWQPackedTensor" else None
        return ("subclass", type(t), inner, meta, awq, t.size(), t.stride())
    sid = storages.setdefault(storage_key(t), len(storages))  # inner tensors sharing a storage still do
    n = t.untyped_storage().nbytes() // t.element_size()
    return ("plain", sid, n, t.dtype, t.device, t.shape, t.stride(), t.storage_offset())


def _rebuild(spec: tuple, bases: dict[tuple[int, torch.dtype], torch.Tensor]) -> torch.Tensor:
    """A new tensor of `_structure`'s description: same (sub)classes, shapes, strides, dtypes, storage sharing."""
    if spec[0] == "subclass":
        _, cls, inner_specs, meta, awq, size, stride = spec
        inner = {n: _rebuild(i, bases) for n, i in inner_specs.items()}
        if awq is not None:  # quanto 0.2.7 cannot read back its own metadata ("AWQPacking.V2")
            return cls(inner["_data"], *awq, size, stride)
        return cls.__tensor_unflatten__(inner, meta, size, stride)
    _, sid, n, dtype, device, shape, stride, offset = spec
    base = bases.get((sid, dtype))
    if base is None:
        base = bases[sid, dtype] = torch.empty(n, dtype=dtype, device=device)
    return base.as_strided(shape, stride, offset)

"""Device memory of a fake run: every storage an operator creates, freed when its storage object dies.

A `FakeTensor` has a storage of real size but no memory, so what a real device would hold is the sum
of the live fake storages, and `torch.cuda.memory_allocated` is what the caching allocator makes of
them (`CachingAllocator`). `MemTrace.track` is fed every tensor an operator returns (inner tensors of
quanto's subclasses included); a storage is counted once, on the device its tensor reports, and
released through a `weakref.finalize` on the storage object (torch keeps one Python object per
storage while it lives).

Phases (`with trace.phase("decode"):`) keep, per name, the calls, the peaks of allocated, reserved and
exact bytes while any call was open, and the largest growth over a call's start. `capture()` records
the allocation sequence of a block of code and `replay()` plays it into the allocator again, the
blocks it leaves live going to the next tensors of their sizes: the loader traces one Linear per
distinct shape and replays the rest (see `replay.LoaderMemo`).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from cogbatch.dryrun.allocator import Block, CachingAllocator, SimulatedOutOfMemory


@dataclass
class PhaseStats:
    """One phase name's figures over all its calls (bytes of the traced device)."""

    name: str
    calls: int = 0
    seconds: float = 0.0  # wall time of the trace itself in this phase
    ops: int = 0
    start_allocated: int = 0  # allocated when the first call began
    start_exact: int = 0  # live tensor bytes when the first call began (what the phase found on the device)
    end_allocated: int = 0  # allocated when the last call ended
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_exact: int = 0  # live tensor bytes, unrounded
    growth: int = 0  # largest (peak allocated - allocated at the call's start) over the calls

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _OpenPhase:
    __slots__ = ("allocated0", "ops0", "peak_allocated", "peak_exact", "peak_reserved", "stats", "t0")

    def __init__(self, stats: PhaseStats, allocated: int, reserved: int, exact: int, ops: int) -> None:
        self.stats = stats
        self.allocated0 = allocated
        self.peak_allocated, self.peak_reserved, self.peak_exact = allocated, reserved, exact
        self.t0 = time.perf_counter()
        self.ops0 = ops


class MemTrace:
    """Live fake storages per device type and the allocator model of the `cuda` one."""

    def __init__(self, allocator: CachingAllocator) -> None:
        self.allocator = allocator
        self.live: dict[int, tuple[str, int, Block | None]] = {}
        self.exact: Counter[str] = Counter()  # live bytes per device type
        self.peak_exact: Counter[str] = Counter()
        self.ops = 0
        self.phases: dict[str, PhaseStats] = {}
        self._open: list[_OpenPhase] = []
        self._capture: list[tuple[int, int]] | None = None
        self._capture_ids: dict[int, int] = {}
        self._adoptable: dict[int, list[Block | None]] = {}  # replayed blocks waiting for their tensors
        self.largest: list[tuple[int, str, tuple[int, ...], str]] = []  # (bytes, phase, shape, dtype) >= 256 MiB

    # -- storages -------------------------------------------------------------------------------

    def track(self, t: Any) -> None:
        """Count the storage of tensor `t` (and of the inner tensors of a wrapper subclass) if it is new."""
        if not isinstance(t, FakeTensor):
            if is_traceable_wrapper_subclass(t):  # quanto's weights: count their inner tensors
                for name in t.__tensor_flatten__()[0]:
                    self.track(getattr(t, name))
            return  # otherwise a real (CPU) tensor: not device memory
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        nbytes = st.nbytes()
        device = t.device.type
        block = self._alloc(device, nbytes)
        self.live[key] = (device, nbytes, block)
        weakref.finalize(st, self._storage_freed, key)
        if device == "cuda" and nbytes >= 256 * 2**20:
            self.largest.append((nbytes, self.current_phase or "-", tuple(t.shape), str(t.dtype)))

    def _alloc(self, device: str, nbytes: int) -> Block | None:
        if self._adoptable and device == "cuda":
            waiting = self._adoptable.get(nbytes)
            if waiting:  # a replayed allocation: already counted, now owned by this storage
                block = waiting.pop(0)
                if not waiting:
                    del self._adoptable[nbytes]
                return block
        block = None
        if device == "cuda" and nbytes:
            try:
                block = self.allocator.malloc(nbytes)
            except SimulatedOutOfMemory as e:  # what the project catches on a real card
                raise torch.OutOfMemoryError(str(e)) from None
        exact = self.exact[device] + nbytes
        self.exact[device] = exact
        if exact > self.peak_exact[device]:
            self.peak_exact[device] = exact
        if block is None:
            return None
        if self._capture is not None:
            self._capture_ids[id(block)] = len(self._capture)
            self._capture.append((0, nbytes))
        a = self.allocator.stats
        for p in self._open:
            if a.allocated > p.peak_allocated:
                p.peak_allocated = a.allocated
            if a.reserved > p.peak_reserved:
                p.peak_reserved = a.reserved
            if exact > p.peak_exact:
                p.peak_exact = exact
        return block

    def _release(self, device: str, nbytes: int, block: Block | None) -> None:
        self.exact[device] -= nbytes
        if block is not None:
            if self._capture is not None:
                index = self._capture_ids.pop(id(block), None)
                if index is not None:
                    self._capture.append((1, index))
            self.allocator.free(block)

    def _storage_freed(self, key: int) -> None:
        info = self.live.pop(key, None)
        if info is not None:
            self._release(*info)

    @property
    def allocated(self) -> int:
        return self.allocator.stats.allocated

    # -- replays --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[int, int]]]:
        """Record the device allocations and frees made inside the block: (0, bytes) or (1, index of the alloc)."""
        script: list[tuple[int, int]] = []
        self._capture, self._capture_ids = script, {}
        try:
            yield script
        finally:
            self._capture, self._capture_ids = None, {}

    def replay(self, script: list[tuple[int, int]]) -> None:
        """Play a captured sequence into the allocator. What it left live waits, in its blocks, for the tensors
        the caller creates next: a new storage of one of those sizes takes its block (`release_unadopted`
        frees what no tensor took)."""
        blocks: dict[int, tuple[int, Block | None]] = {}
        for i, (kind, value) in enumerate(script):
            if kind == 0:
                blocks[i] = (value, self._alloc("cuda", value))
            else:
                nbytes, block = blocks.pop(value)
                self._release("cuda", nbytes, block)
        for nbytes, block in blocks.values():
            self._adoptable.setdefault(nbytes, []).append(block)

    def release_unadopted(self) -> None:
        for nbytes, waiting in self._adoptable.items():
            for block in waiting:
                self._release("cuda", nbytes, block)
        self._adoptable = {}

    # -- phases ---------------------------------------------------------------------------------

    @property
    def current_phase(self) -> str | None:
        return self._open[-1].stats.name if self._open else None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        stats = self.phases.get(name)
        a = self.allocator.stats
        if stats is None:
            stats = self.phases[name] = PhaseStats(name, start_allocated=a.allocated, start_exact=self.exact["cuda"])
        p = _OpenPhase(stats, a.allocated, a.reserved, self.exact["cuda"], self.ops)
        self._open.append(p)
        try:
            yield stats
        finally:
            self._open.remove(p)
            stats.calls += 1
            stats.seconds += time.perf_counter() - p.t0
            stats.ops += self.ops - p.ops0
            stats.end_allocated = a.allocated
            stats.peak_allocated = max(stats.peak_allocated, p.peak_allocated)
            stats.peak_reserved = max(stats.peak_reserved, p.peak_reserved)
            stats.peak_exact = max(stats.peak_exact, p.peak_exact)
            stats.growth = max(stats.growth, p.peak_allocated - p.allocated0)


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (shared by its views)."""
    return t.untyped_storage()._cdata

"""Everything a fake-CUDA run needs, entered and left as one context: device, modes, patches.

    with FakeCudaSession(capability=(8, 6), card_bytes=11 * 2**30) as s:
        x = torch.empty(4096, 4096, dtype=torch.bfloat16, device="cuda")   # a FakeTensor
        s.allocator.stats.allocated                                          # 32 MiB

Order matters: the device guard is process-wide; `FakeCuda` and `Patches` change module attributes;
`FakeTensorMode` makes tensors fake; `TraceMode` (above fake mode) sees every operator.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cogbatch.dryrun.allocator import CachingAllocator
from cogbatch.dryrun.fakecuda import FakeCuda, install_device_guard
from cogbatch.dryrun.kernels import SdpaMirror
from cogbatch.dryrun.memtrace import MemTrace
from cogbatch.dryrun.mode import TraceMode
from cogbatch.dryrun.oracle import ValueOracle
from cogbatch.dryrun.patches import QUANTO_TYPE_CHECKED, Patches

PRELOADED = ("optimum.quanto", *QUANTO_TYPE_CHECKED)


class _FakeMode(FakeTensorMode):
    """Fake mode as on a machine without CUDA, although `torch.cuda.is_available()` says True during a run:
    `torch.tensor(..., device="cuda")` must build on the CPU and lift, never touch a CUDA kernel."""

    @property
    def avoid_device_init(self) -> bool:
        return True


class FakeCudaSession:
    """One fake device of `card_bytes`, whose allocator may use `card_bytes - context_bytes`."""

    def __init__(
        self,
        capability: tuple[int, int] = (8, 6),
        card_bytes: int = 11 * 2**30,
        context_bytes: int = 0,
        expandable_segments: bool = False,
        raise_oom: bool = False,
        strict_kernels: bool = True,
        sdpa_mirror: bool = True,
        guard_build_dir: Path | None = None,
    ) -> None:
        self.capability = capability
        self.card_bytes = card_bytes
        self.allocator = CachingAllocator(card_bytes - context_bytes, expandable_segments, raise_oom)
        self.trace = MemTrace(self.allocator)
        self.oracle = ValueOracle(self.trace.track)
        self.sdpa = SdpaMirror(capability, lambda: self.trace.current_phase) if sdpa_mirror else None
        self.mode = TraceMode(self.trace, self.oracle, capability, strict=strict_kernels)
        self.guard_build_dir = guard_build_dir
        self.guard: str | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> FakeCudaSession:
        self.guard = install_device_guard(self.guard_build_dir)
        # Import before `torch.cuda` is patched: torch._dynamo (which quanto, transformers and the loader
        # import) indexes torch.cuda's functions at import time and refuses patched ones.
        for module in ("torch._dynamo", *PRELOADED):
            importlib.import_module(module)
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(FakeCuda(self.allocator, self.capability, self.card_bytes))
            stack.enter_context(Patches(self.oracle, self.sdpa, self.capability))
            stack.enter_context(torch.no_grad())
            stack.enter_context(_FakeMode(allow_non_fake_inputs=True))
            stack.enter_context(self.mode)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @contextlib.contextmanager
    def outside(self) -> Any:
        """Leave the fake modes for a block (building a model on `meta`, plain Python objects), keep the patches."""
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            yield

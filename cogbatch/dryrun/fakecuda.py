"""A CUDA device that exists only as far as Python can see: device guard, `torch.version.cuda`, `torch.cuda` queries.

A CPU-only torch build can dispatch operators on `FakeTensor`s whose device is `cuda`, but the C++
paths that open a device guard (Python indexing `t[a:b]`, `t[mask] = v`, `.to("cuda")`) fail with
"PyTorch is not linked with support for cuda devices": nothing registered a `DeviceGuardImpl` for
CUDA. `install_device_guard` registers one without a compiler:

* torch's Python-backend hooks (`torch._C._acc.register_python_privateuseone_device_guard`) build a
  C++ guard object around a Python class; ours reports the CUDA device type;
* the guard is registered for PrivateUse1 (the only slot that Python API writes), and its pointer is
  copied into the CUDA slot through c10's exported `c10::impl::registerDeviceGuard`, called with
  ctypes; the PrivateUse1 slot is then cleared again.

If those private symbols are missing (another torch build), a 10-line C++ extension registering c10's
`FakeGuardImpl<CUDA>` is built with `torch.utils.cpp_extension.load_inline` (needs g++) and cached
under the cogbatch cache directory. The registration lasts for the process: it only matters to
tensors whose device is `cuda`, which a CPU-only build never has outside a fake run.

`FakeCuda` answers the `torch.cuda` queries the project makes (capability, name, memory statistics,
`mem_get_info`, `synchronize`, `empty_cache`) from a `CachingAllocator` model while it is entered,
and restores every attribute on exit.
"""

from __future__ import annotations

import ctypes
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cogbatch.dryrun.allocator import CachingAllocator

_REGISTRY_SYMBOL = "_ZN3c104impl26device_guard_impl_registryE"  # c10::impl::device_guard_impl_registry
_REGISTER_SYMBOL = "_ZN3c104impl19registerDeviceGuardENS_10DeviceTypeEPKNS0_24DeviceGuardImplInterfaceE"
_CUDA, _PRIVATE_USE1 = 1, 20  # c10::DeviceType values
_guard_keepalive: list[Any] = []  # the registered guard objects must outlive every fake cuda tensor
GUARD_HOW: str | None = None  # how the guard was installed, for reports: "python" or "extension"

_EXTENSION_SOURCE = """
#include <torch/extension.h>
#include <c10/core/impl/FakeGuardImpl.h>
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
bool registered() { return c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA); }
"""


class DeviceGuardError(RuntimeError):
    """No way to register a CUDA device guard in this torch build."""


def _c10() -> ctypes.CDLL:
    return ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))


def _guard_slots(lib: ctypes.CDLL) -> Any:
    return (ctypes.c_void_p * 64).in_dll(lib, _REGISTRY_SYMBOL)


def _install_python_guard() -> None:
    lib = _c10()
    slots = _guard_slots(lib)
    register = getattr(lib, _REGISTER_SYMBOL)
    register.argtypes = [ctypes.c_int8, ctypes.c_void_p]
    register.restype = None
    device_type = torch._C._autograd.DeviceType

    class CudaTypedGuard(torch._C._acc.DeviceGuard):
        def type_(self) -> Any:
            return device_type.CUDA

    guard = CudaTypedGuard()
    previous = slots[_PRIVATE_USE1]
    torch._C._acc.register_python_privateuseone_device_guard(guard)
    try:
        pointer = slots[_PRIVATE_USE1]
        if not pointer:
            raise DeviceGuardError("torch did not register the Python device guard")
        register(_CUDA, pointer)
    finally:
        register(_PRIVATE_USE1, previous)
    _guard_keepalive.append(guard)


def _install_extension_guard(build_dir: Path) -> None:
    from torch.utils.cpp_extension import load_inline

    build_dir.mkdir(parents=True, exist_ok=True)
    module = load_inline(
        name="cogbatch_fake_cuda_guard",
        cpp_sources=[_EXTENSION_SOURCE],
        functions=["registered"],
        build_directory=str(build_dir),
        extra_cflags=["-O1"],
    )
    if not module.registered():
        raise DeviceGuardError("the fake CUDA guard extension did not register")
    _guard_keepalive.append(module)


def cuda_guard_registered() -> bool:
    try:
        return bool(_guard_slots(_c10())[_CUDA])
    except (OSError, AttributeError, ValueError):
        return False


def install_device_guard(build_dir: Path | None = None) -> str:
    """Register a device guard for CUDA (once per process); returns "python", "extension" or "native"."""
    global GUARD_HOW
    if GUARD_HOW is not None:
        return GUARD_HOW
    if torch.cuda.is_available() or cuda_guard_registered():
        GUARD_HOW = "native"
        return GUARD_HOW
    errors = []
    try:
        _install_python_guard()
        GUARD_HOW = "python"
        return GUARD_HOW
    except (OSError, AttributeError, ValueError, DeviceGuardError) as e:
        errors.append(f"Python guard: {type(e).__name__}: {e}")
    if build_dir is not None:
        try:
            _install_extension_guard(build_dir)
            GUARD_HOW = "extension"
            return GUARD_HOW
        except Exception as e:  # a compiler error has many types
            errors.append(f"extension: {type(e).__name__}: {str(e)[:300]}")
    raise DeviceGuardError("cannot register a CUDA device guard in this torch build (" + "; ".join(errors) + ")")


class FakeCuda:
    """While entered: `torch.cuda` reports one device of `capability` and `total_memory`, with the model's memory.

    `torch.cuda.is_available()` is True, `torch.version.cuda` is set (the TinyGemm choice needs >= 12.1),
    and the memory statistics come from `allocator`; `empty_cache` releases its free segments.
    """

    def __init__(
        self,
        allocator: CachingAllocator,
        capability: tuple[int, int],
        total_memory: int,
        name: str | None = None,
        cuda_version: str = "12.4",
    ) -> None:
        self.allocator = allocator
        self.capability = capability
        self.total_memory = total_memory
        self.name = name or f"fake sm{capability[0]}{capability[1]} ({total_memory / 2**30:.1f} GiB)"
        self.cuda_version = cuda_version
        self._saved: list[tuple[Any, str, Any]] = []

    def _properties(self) -> Any:
        major, minor = self.capability
        return types.SimpleNamespace(
            name=self.name, major=major, minor=minor, total_memory=self.total_memory, multi_processor_count=68,
            is_integrated=False, is_multi_gpu_board=False,
        )  # fmt: skip

    def _patches(self) -> dict[tuple[Any, str], Any]:
        a = self.allocator
        c = torch.cuda

        def per_device(value: Callable[[], Any]) -> Callable[..., Any]:
            return lambda device=None: value()

        return {
            (torch.version, "cuda"): self.cuda_version,
            (c, "is_available"): lambda: True,
            (c, "device_count"): lambda: 1,
            (c, "current_device"): lambda: 0,
            (c, "set_device"): lambda device: None,
            (c, "is_initialized"): lambda: True,
            (c, "get_device_capability"): per_device(lambda: self.capability),
            (c, "get_device_name"): per_device(lambda: self.name),
            (c, "get_device_properties"): per_device(self._properties),
            (c, "synchronize"): lambda device=None: None,
            (c, "empty_cache"): lambda: a.empty_cache() and None,
            (c, "memory_allocated"): per_device(lambda: a.stats.allocated),
            (c, "max_memory_allocated"): per_device(lambda: a.user_peak_allocated),
            (c, "memory_reserved"): per_device(lambda: a.stats.reserved),
            (c, "max_memory_reserved"): per_device(lambda: a.user_peak_reserved),
            (c, "reset_peak_memory_stats"): per_device(a.reset_peak),
            (c, "mem_get_info"): per_device(lambda: (self._free(), self.total_memory)),
            (c.memory, "_set_allocator_settings"): self._allocator_settings,
        }

    def _free(self) -> int:
        """What the driver would report free: the card less the context (outside the allocator) and less what
        the allocator reserved; a worker plans under it when it is below the job's ceiling (`usable_ceiling`)."""
        a = self.allocator
        return max(0, (self.total_memory if a.capacity is None else a.capacity) - a.stats.reserved)

    def _allocator_settings(self, settings: str) -> None:
        """torch's runtime allocator setter: `expandable_segments` applies to the segments made from now on."""
        for item in settings.split(","):
            key, _, value = item.partition(":")
            if key.strip() == "expandable_segments":
                self.allocator.expandable = value.strip() == "True"

    def __enter__(self) -> FakeCuda:
        for (owner, name), value in self._patches().items():
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)

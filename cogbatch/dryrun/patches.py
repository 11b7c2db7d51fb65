"""The few patches of torch and optimum-quanto that a fake run needs, all undone on exit.

* quanto tests `type(x) is torch.Tensor` where it means "a plain tensor, not a quanto tensor"; a
  `FakeTensor` is a subclass and fails it. In `tensor/weights/tinygemm/qbits.py` that turns the CUDA
  repack into an assertion error and sends every fake activation to `.dequantize()`; in
  `tensor/weights/qbits.py` it leaves a re-created fallback weight unpacked (twice its bytes). A
  module-level `type` in those modules answers `torch.Tensor` for fake tensors: no quanto source is
  rewritten, and its Python checks behave as they do on real tensors.
* `FakeTensor.tolist` answers from the value oracle; `FakeTensor.data_ptr` gives each storage its own
  address (fake tensors report 0, which makes the loader's `_owned` copy tensors a real move never copies).
* `F.scaled_dot_product_attention` goes to the CUDA backend mirror (`kernels.SdpaMirror`).
* On sm80+, quanto's CUDA extension counts as available (`is_extension_available("quanto_cuda")`),
  as it is on a Linux machine with CUDA (quanto registers it at import and builds it on first use):
  fp16 int4 weights then get the AWQ class there, as on the GPU.
"""

from __future__ import annotations

import builtins
import importlib
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from cogbatch.dryrun.kernels import SdpaMirror, define_awq_op
from cogbatch.dryrun.oracle import ValueOracle

# quanto 0.2.x modules whose `type(x) is torch.Tensor` tests run on fake tensors in a trace.
QUANTO_TYPE_CHECKED = (
    "optimum.quanto.tensor.weights.qbits",
    "optimum.quanto.tensor.weights.tinygemm.qbits",
    "optimum.quanto.tensor.weights.awq.qbits",
)
_MISSING = object()


def _plain_type(obj: Any, *rest: Any) -> Any:
    if rest:  # type(name, bases, dict)
        return builtins.type(obj, *rest)
    if isinstance(obj, FakeTensor):
        return torch.Tensor
    return builtins.type(obj)


def _fake_data_ptr(self: torch.Tensor) -> int:
    return self.untyped_storage()._cdata + self.storage_offset() * self.element_size()


class AttrPatches:
    """Set attributes while entered; exit restores them, removing those that were inherited or absent."""

    def __init__(self, patches: list[tuple[Any, str, Any]]) -> None:
        self.patches = patches
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> AttrPatches:
        try:
            for owner, name, value in self.patches:
                own = owner.__dict__ if isinstance(owner, (type, ModuleType)) else None
                before = own.get(name, _MISSING) if own is not None else getattr(owner, name, _MISSING)
                self._saved.append((owner, name, before))
                setattr(owner, name, value)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


class _QuantoCudaExtension:
    """Registered under quanto's name while a fake sm80+ device is on: never built, its kernel has a stand-in."""

    name = "quanto_cuda"

    def __init__(self) -> None:
        self._registry: dict[str, Any] = {}
        self._added = False

    def __enter__(self) -> None:
        from optimum.quanto.library.extensions import extension

        define_awq_op()
        self._registry = extension._extensions
        if self.name not in self._registry:
            self._registry[self.name] = self
            self._added = True

    def __exit__(self, *exc: object) -> None:
        if self._added:
            del self._registry[self.name]
            self._added = False


class Patches(AttrPatches):
    """Every patch a fake run needs; exit restores the originals (also after an error)."""

    def __init__(self, oracle: ValueOracle, sdpa: SdpaMirror | None, capability: tuple[int, int] = (8, 0)) -> None:
        self.extension = _QuantoCudaExtension() if capability >= (8, 0) else None
        patches: list[tuple[Any, str, Any]] = [
            (importlib.import_module(name), "type", _plain_type) for name in QUANTO_TYPE_CHECKED
        ]

        def tolist(t: torch.Tensor) -> Any:
            return oracle.tolist(t)

        patches += [(FakeTensor, "tolist", tolist), (FakeTensor, "data_ptr", _fake_data_ptr)]
        if sdpa is not None:
            patches.append((F, "scaled_dot_product_attention", sdpa))
        super().__init__(patches)

    def __enter__(self) -> Patches:
        super().__enter__()
        if self.extension is not None:
            self.extension.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.extension is not None:
            self.extension.__exit__()
        super().__exit__()

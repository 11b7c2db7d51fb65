"""The one dispatch mode of a fake run: memory, values, kernel checks and counters in a single Python hop.

Every operator of a fake run passes through Python several times already (`FakeTensorMode` is most
of the cost of a trace); each extra `TorchDispatchMode` adds a hop per operator, so the trace's
concerns share one mode, in this order:

0. an operator on a quanto tensor runs that tensor's own dispatch under this mode;
1. the oracle answers value operators (`item`, `nonzero`) and rewrites boolean-mask indices;
2. int4 CUDA kernels are checked (`kernels.check_int4_op`), interesting operators counted;
3. quanto's custom operators run their CUDA (else default) Python kernel *under this mode*, so
   that their temporaries (the dense copy of an int8 weight) are seen like any other allocation;
   those that exist only as compiled CUDA code (AWQ) run a stand-in (`kernels.FAKE_QUANTO_KERNELS`);
4. new storages of the results are tracked (views and in-place results share theirs);
5. the oracle gives int64/bool results their values.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type

from cogbatch.dryrun.kernels import COUNTED_OPS, FAKE_QUANTO_KERNELS, check_int4_op
from cogbatch.dryrun.memtrace import MemTrace
from cogbatch.dryrun.oracle import ValueOracle

_DEVICE = torch.ops.prim.device.default
_DK = torch._C.DispatchKey


class _OpInfo:
    __slots__ = ("allocates", "counted", "fake_kernel", "int4", "name", "python_kernel")

    def __init__(self, func: Any) -> None:
        self.name = func.__name__.split(".")[0]
        returns = func._schema.returns
        # Views and in-place operators return (aliases of) their inputs: nothing new to track.
        self.allocates = bool(returns) and not all(r.alias_info is not None for r in returns)
        self.counted = self.name in COUNTED_OPS or func.namespace == "quanto"
        self.int4 = self.name in ("_convert_weight_to_int4pack", "_weight_int4pack_mm")
        self.python_kernel = None
        self.fake_kernel = FAKE_QUANTO_KERNELS.get(self.name) if func.namespace == "quanto" else None
        if func.namespace == "quanto" and self.fake_kernel is None:
            cuda = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CUDA")
            self.python_kernel = _DK.CUDA if cuda else _DK.CompositeExplicitAutograd


class TraceMode(TorchDispatchMode):
    """Enter it inside a `FakeTensorMode` (fake mode always runs below user modes)."""

    def __init__(self, trace: MemTrace, oracle: ValueOracle, capability: tuple[int, int], strict: bool = True) -> None:
        super().__init__()
        self.trace = trace
        self.oracle = oracle
        self.capability = capability
        self.strict = strict  # False: record kernel-check failures instead of raising them
        self.counts: Counter[str] = Counter()
        self.check_failures: Counter[str] = Counter()
        self._info: dict[Any, _OpInfo] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _DEVICE:
            return func(*args)
        kwargs = kwargs or {}
        if types and (len(types) > 1 or types[0] is not FakeTensor):
            subclass = next((t for t in types if t is not FakeTensor and is_traceable_wrapper_subclass_type(t)), None)
            if subclass is not None:
                # A quanto tensor's own dispatch (fake mode declines it): run it under this mode, so that what it
                # computes from its inner tensors (the dense copy of a fallback weight) is seen and tracked.
                with self:
                    return subclass.__torch_dispatch__(func, types, args, kwargs)
        info = self._info.get(func)
        if info is None:
            info = self._info[func] = _OpInfo(func)
        self.trace.ops += 1
        oracle = self.oracle
        if oracle.enabled:
            handled, result = oracle.answer(func, args)
            if handled:
                return result
            args = oracle.rewrite(func, args)
        else:
            handled, result = oracle.assume(func, args)
            if handled:
                return result
        if info.counted:
            self.counts[info.name] += 1
        if info.int4 and args[0].device.type == "cuda":
            try:
                check_int4_op(info.name, args, self.capability)
            except Exception as e:
                if self.strict:
                    raise
                self.check_failures[str(e)] += 1
        if info.fake_kernel is not None:
            out = info.fake_kernel(*args, **kwargs)
        elif info.python_kernel is not None and _on_cuda(args):
            with self:
                out = func._op_dk(info.python_kernel, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if info.allocates:
            if isinstance(out, torch.Tensor):
                self.trace.track(out)
            elif isinstance(out, (tuple, list)):
                for t in out:
                    if isinstance(t, torch.Tensor):
                        self.trace.track(t)
        if oracle.enabled:
            oracle.propagate(func, args, kwargs, out)
        else:
            oracle.tag(func, out)
        return out


def _on_cuda(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)

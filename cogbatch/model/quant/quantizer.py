"""Row blocks of a float weight quantized exactly as optimum-quanto quantizes the whole weight, only faster.

quanto's int4 recipe (`MaxOptimizer` + `quantize_affine`, in the compute dtype) is, per group of
`g` input columns: scale = (max - min) / 15, shift = -min, code = clamp(round((w + shift) / scale), 0, 15).
Run through quanto it costs ~40 ms per 6.3 M weights on one core, this ~11 ms (docs/performance.md):
reductions in bf16, fresh temporaries on every call, and a float -> uint8 conversion. This computes
the same bits with fewer and cheaper passes:

* min and max are taken on an fp32 copy of the block (6x faster than on bf16). Rounding to the
  compute dtype is monotonic, so it commutes with min and max; only the sign of a zero may differ
  between the two reductions, so groups whose min or max is zero are redone on the compute dtype.
* (w + shift) / scale runs in the compute dtype, each op rounding as quanto's do; the rounding to an
  integer is then an addition of 1/eps (128 for bf16): 128 + u lands in [128, 144), where the
  dtype's spacing is 1, so round-half-even happens in the addition and the code is the low byte of
  the result's bits (0x4300 | code in bf16). The result stays a 16-bit (or 32-bit) integer view:
  packing reads the low bytes, no conversion pass.
* A group whose scale is 0 (all weights equal) divides 0 by 0; quanto's NaN becomes code 0, and so
  does ours. Blocks with non-finite weights take quanto's own ops.

Scratch buffers belong to one thread (`for_thread`), so the loader's workers quantize disjoint row
blocks in parallel without allocating (fresh multi-MB temporaries cost page faults on every call).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch

_INT_VIEW = {2: torch.int16, 4: torch.int32}


@dataclass
class Timings:
    """Seconds per phase, summed over the blocks one thread processed (the load report adds the threads)."""

    read: float = 0.0  # the checkpoint's bytes into the scratch buffer (page cache or disk, and the cast)
    quantize: float = 0.0  # min, max, scale, shift, codes
    pack: float = 0.0  # codes into the kernel's layout (builders)


class GroupQuantizer:
    """One thread's scratch space for quantizing blocks of up to `capacity` weights (see the module doc)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, capacity: int) -> None:
        self.dtype = dtype
        self.device = device
        self.capacity = capacity
        self._f32 = torch.empty(capacity, dtype=torch.float32, device=device)
        self._x = torch.empty(capacity, dtype=dtype, device=device)
        self._t = torch.empty(capacity, dtype=dtype, device=device)
        self._magic = 1.0 / torch.finfo(dtype).eps  # 128 for bf16, 1024 for fp16, 2**23 for fp32

    def _load(self, src: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block in fp32, block in the compute dtype), both grouped: (rows * k / group, group)."""
        m = src.numel()
        if m > self.capacity:
            raise ValueError(f"block of {m} weights exceeds the quantizer's {self.capacity}")
        f32 = self._f32[:m].view(src.shape)
        f32.copy_(src)  # from the checkpoint's dtype (fp16, bf16 or fp32): exact
        x = self._x[:m].view(-1, group)
        x.copy_(f32.view(-1, group))  # the compute dtype: quanto's `weight.to(dtype)`
        return f32.view(-1, group), x

    def int4(
        self, src: torch.Tensor, group: int, times: Timings | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, shift) of a (rows, k) block: codes is an integer view of shape (rows, k) whose
        low byte holds each 4-bit code; scale and shift are (rows * k / group, 1) in the compute dtype."""
        t0 = time.perf_counter()
        f32, x = self._load(src, group)
        t1 = time.perf_counter()
        out = self._int4(f32, x, *src.shape, group)
        if times is not None:
            times.read += t1 - t0
            times.quantize += time.perf_counter() - t1
        return out

    def _int4(self, f32: torch.Tensor, x: torch.Tensor, rows: int, k: int, group: int):
        mn32 = torch.amin(f32, 1, keepdim=True)
        mx32 = torch.amax(f32, 1, keepdim=True)
        if not (torch.isfinite(mn32).all() and torch.isfinite(mx32).all()):
            return self._int4_reference(x, rows, k, group)
        mn, mx = mn32.to(self.dtype), mx32.to(self.dtype)
        signed_zero = ((mn32 == 0) | (mx32 == 0)).view(-1)
        if signed_zero.any():  # -0.0 or +0.0: take the one quanto's reduction in the compute dtype takes
            groups = x[signed_zero]
            mn[signed_zero], mx[signed_zero] = torch.amin(groups, 1, keepdim=True), torch.amax(groups, 1, keepdim=True)
        scale = (mx - mn) / 15  # MaxOptimizer: (rmax - rmin) / (qmax - qmin)
        shift = -mn
        t = self._t[: x.numel()].view(-1, group)
        torch.add(x, shift, out=t)
        t.div_(scale).clamp_(0, 15).add_(self._magic)  # round-half-even to an integer inside the addition
        constant = (scale == 0).view(-1)
        if constant.any():
            t[constant] = self._magic  # 0 / 0: quanto's NaN converts to code 0
        return t.view(_INT_VIEW[self.dtype.itemsize]).view(rows, k), scale, shift

    def _int4_reference(self, x: torch.Tensor, rows: int, k: int, group: int):
        """quanto's own ops, for blocks with inf or NaN weights (their codes are quanto's, bit for bit)."""
        from optimum.quanto import qint4
        from optimum.quanto.tensor import MaxOptimizer

        scale, shift = MaxOptimizer()(x, qtype=qint4, axis=0)
        codes = torch.ops.quanto.quantize_affine(x, bits=4, axis=0, group_size=None, scale=scale, shift=shift)
        return codes.view(rows, k), scale, shift

    def int8(self, src: torch.Tensor, times: Timings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 data, scale) of a (rows, k) block: quanto's `AbsmaxOptimizer` + `quantize_symmetric`, per row."""
        rows, k = src.shape
        t0 = time.perf_counter()
        f32, x = self._load(src, k)
        t1 = time.perf_counter()
        # |.| and rounding to the compute dtype commute, and |-0| = |+0|: the fp32 maximum is exact
        scale = torch.amax(f32.abs_(), 1, keepdim=True).to(self.dtype) / 127
        t = self._t[: x.numel()].view(rows, k)
        torch.div(x, scale, out=t)
        data = t.round_().clamp_(-128, 127).to(torch.int8)
        if times is not None:
            times.read += t1 - t0
            times.quantize += time.perf_counter() - t1
        return data, scale


_local = threading.local()


def for_thread(dtype: torch.dtype, device: torch.device, capacity: int) -> GroupQuantizer:
    """The calling thread's quantizer for this dtype and device, with room for at least `capacity` weights."""
    q = getattr(_local, "quantizer", None)
    if q is None or q.dtype != dtype or q.device != device or q.capacity < capacity:
        q = _local.quantizer = GroupQuantizer(dtype, device, max(capacity, q.capacity if q is not None else 0))
    return q


def block_rows(n: int, k: int, elements: int, align: int) -> list[tuple[int, int]]:
    """[a, b) row blocks of about `elements` weights, `align`-aligned (TinyGemm's row blocks), covering n rows."""
    step = max(align, elements // max(k, 1) // align * align)
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def block_capacity(shape: tuple[int, ...], elements: int, align: int) -> int:
    """Weights in the largest block `block_rows` makes for this shape."""
    n, k = shape[0], math.prod(shape[1:])
    return max(b - a for a, b in block_rows(n, k, elements, align)) * k

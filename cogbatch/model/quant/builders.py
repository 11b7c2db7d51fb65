"""What one checkpoint tensor becomes, built from its row blocks: a quantized weight in its kernel's layout,
or a plain tensor in the compute dtype.

A builder owns the final buffers of one tensor and fills them a row block at a time (`fill`, called by
the loader's worker threads, each with its own `GroupQuantizer`), then hands over the finished tensor
(`finish`, on the loader's thread). Blocks of one builder write disjoint rows, so they may run in any
order and in parallel, except where `parallel` is False: quanto's portable int4 packing stores row r
and row r + R/2 in one byte, so those builders take the whole tensor as one block.

Which builder a Linear gets is the kernel quanto will run for it (`plan.layer_kernel`): on CPU the bf16
group-128 layers go straight into TinyGemm's layout, never through the portable one.
"""

from __future__ import annotations

import math
import time

import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.packed import PackedTensor

from cogbatch.model.quant.pack import encode_tinygemm_cpu, optimize_weight, tinygemm_cpu_layout, tinygemm_tensor
from cogbatch.model.quant.plan import LayerQuant
from cogbatch.model.quant.quantizer import Timings, block_rows, for_thread

# Weights per block: large enough that the ~20 tensor ops per block cost little, small enough that a
# worker's scratch space (7 B per weight) stays a few MB. Measured flat from 0.2 M to 1.6 M weights.
BLOCK_ELEMENTS = 1 << 20


class Builder:
    """One tensor's final buffers, filled by row blocks; `parallel`: its blocks may run concurrently."""

    parallel = True
    align = 1  # row blocks start at multiples of this

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device

    def blocks(self) -> list[tuple[int, int]]:
        """[a, b) row ranges, one `fill` each."""
        rows = self.shape[0] if self.shape else 1
        if not self.parallel or len(self.shape) < 2:
            return [(0, rows)]
        return block_rows(rows, math.prod(self.shape[1:]), BLOCK_ELEMENTS, self.align)

    def fill(self, src: torch.Tensor, a: int, b: int, times: Timings) -> None:
        """Rows [a, b) from `src` (the whole checkpoint tensor, a view of the file)."""
        raise NotImplementedError

    def finish(self) -> torch.Tensor:
        """The built tensor, once every block is filled."""
        raise NotImplementedError


class CastBuilder(Builder):
    """A tensor that stays in floating point: the checkpoint's rows cast to the compute dtype."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, dtype, device)
        self.out = torch.empty(self.shape, dtype=dtype, device=device)

    def fill(self, src, a, b, times) -> None:
        t0 = time.perf_counter()
        if self.shape:
            self.out[a:b].copy_(src[a:b])
        else:
            self.out.copy_(src)
        times.read += time.perf_counter() - t0

    def finish(self) -> torch.Tensor:
        return self.out


class TinyGemmCPUBuilder(Builder):
    """int4, group 128, bf16, on CPU: codes go straight into TinyGemm's packed rows, scale and shift
    into quanto's (k/128, n, 2) scale-and-mid-point tensor at `finish`."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device, layout: tuple[int, str]):
        super().__init__(shape, dtype, device)
        n, k = shape
        self.layout = layout
        self.align = layout[0]  # TinyGemm's row blocks: 64 (AVX-512) or 32
        self.data = torch.empty((n, k // 2), dtype=torch.uint8)
        self.scale = torch.empty((n * k // 128, 1), dtype=dtype)
        self.shift = torch.empty((n * k // 128, 1), dtype=dtype)

    def fill(self, src, a, b, times) -> None:
        per_row = self.shape[1] // 128
        q = for_thread(self.dtype, self.device, (b - a) * self.shape[1])
        codes, scale, shift = q.int4(src[a:b], 128, times)
        t0 = time.perf_counter()
        self.scale[a * per_row : b * per_row] = scale
        self.shift[a * per_row : b * per_row] = shift
        encode_tinygemm_cpu(codes, self.data[a:b], *self.layout)
        times.pack += time.perf_counter() - t0

    def finish(self) -> torch.Tensor:
        return tinygemm_tensor(self.data, self.scale, self.shift, self.shape, 128)


class PortableInt4Builder(Builder):
    """int4 in quanto's portable layout, then the device's kernel layout (`optimize_weight`: TinyGemm on
    CUDA, AWQ, or the dequantize fallback as it is). Grouped row r and r + ceil(R/2) share a byte, so
    the tensor is one block, quantized a slice of rows at a time."""

    parallel = False

    def __init__(self, shape: tuple[int, int], group: int | None, dtype: torch.dtype, device: torch.device):
        super().__init__(shape, dtype, device)
        n, k = shape
        self.group = group
        gs = group or k
        total = n * (k // gs)
        self.half = (total + 1) // 2
        self.packed = torch.zeros((self.half, gs), dtype=torch.uint8, device=device)
        self.scale = torch.empty((total, 1), dtype=dtype, device=device)
        self.shift = torch.empty((total, 1), dtype=dtype, device=device)

    def fill(self, src, a, b, times) -> None:
        n, k = self.shape
        gs = self.group or k
        per_row, half = k // gs, self.half
        for n0, n1 in block_rows(n, k, BLOCK_ELEMENTS, 1):
            q = for_thread(self.dtype, self.device, (n1 - n0) * k)
            codes, scale, shift = q.int4(src[n0:n1], gs, times)
            t1 = time.perf_counter()
            r0, r1 = n0 * per_row, n1 * per_row
            self.scale[r0:r1], self.shift[r0:r1] = scale, shift
            codes = codes.reshape(-1, gs).to(torch.uint8)  # the low bytes: (rows * per_row, gs)
            low_end = min(r1, half)
            if r0 < low_end:
                self.packed[r0:low_end] |= codes[: low_end - r0]
            if r1 > half:
                start = max(r0, half)
                self.packed[start - half : r1 - half] |= codes[start - r0 :] << 4
            times.pack += time.perf_counter() - t1

    def finish(self) -> torch.Tensor:
        n, k = self.shape
        gs = self.group or k
        data = PackedTensor(self.packed, 4, (n * (k // gs), gs), (gs, 1))
        portable = WeightQBitsTensor(qint4, 0, self.group, (n, k), (k, 1), data, self.scale, self.shift)
        return optimize_weight(portable)


class Int8Builder(Builder):
    """int8, per output row (quanto's symmetric absmax), then `optimize_weight`."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
        super().__init__(shape, dtype, device)
        self.data = torch.empty(shape, dtype=torch.int8, device=device)
        self.scale = torch.empty((shape[0], 1), dtype=dtype, device=device)

    def fill(self, src, a, b, times) -> None:
        q = for_thread(self.dtype, self.device, (b - a) * self.shape[1])
        self.data[a:b], self.scale[a:b] = q.int8(src[a:b], times)

    def finish(self) -> torch.Tensor:
        n, k = self.shape
        return optimize_weight(WeightQBytesTensor(qint8, 0, (n, k), (k, 1), self.data, self.scale, None))


def linear_builder(
    lp: LayerQuant, kernel: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> Builder:
    """The builder of a quantized Linear weight, by the kernel that will run it."""
    if lp.qtype == "int8":
        return Int8Builder(shape, dtype, device)
    if kernel.startswith("tinygemm-cpu"):
        layout = tinygemm_cpu_layout()
        if layout is not None:
            return TinyGemmCPUBuilder(shape, dtype, device, layout)
    return PortableInt4Builder(shape, lp.group_size, dtype, device)

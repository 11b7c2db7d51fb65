"""`cogbatch.model.quant.quantizer`: row blocks quantized bit for bit as optimum-quanto quantizes them.

quanto's own ops on the same block are the reference, including the cases the fast path treats
apart: signed zeros as a group's minimum or maximum, constant groups (0 / 0), non-finite weights.
"""

from __future__ import annotations

import pytest
import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.tensor import AbsmaxOptimizer, MaxOptimizer

from cogbatch.model.quant.quantizer import GroupQuantizer, block_rows, for_thread

CPU = torch.device("cpu")


def quanto_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `QModuleMixin.qweight` computes: MaxOptimizer + quantize_affine on the weight in the compute dtype."""
    scale, shift = MaxOptimizer()(w, qtype=qint4, axis=0, group_size=group)
    codes = torch.ops.quanto.quantize_affine(w, bits=4, axis=0, group_size=group, scale=scale, shift=shift)
    return codes, scale, shift


def quanto_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = AbsmaxOptimizer()(w, qtype=qint8, axis=0)
    return torch.ops.quanto.quantize_symmetric(w, dtype=torch.int8, axis=0, scale=scale), scale


def awkward_weights(n: int, k: int, src_dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the cases that need care: zero rows, constant groups, -0.0 and +0.0 mixed with
    non-negative (and non-positive) values, subnormals, large values."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[0] = 0.0
    w[1, :32] = 0.25  # a constant group (for group sizes up to 32)
    w[2] = torch.rand(k, generator=gen)  # non-negative rows whose minimum is a zero of either sign
    w[2, ::7] = 0.0
    w[2, 3::7] = -0.0
    w[3] = -torch.rand(k, generator=gen)
    w[3, ::5] = -0.0
    w[3, 1::5] = 0.0
    w[4, ::3] = 1e-7
    w[5] = torch.linspace(-60000, 60000, k)
    return w.to(src_dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 != +0.0 and NaN == NaN."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int4_equals_quanto_bit_for_bit(dtype, group, src_dtype):
    w = awkward_weights(24, 256, src_dtype)
    codes, scale, shift = GroupQuantizer(dtype, CPU, 1 << 16).int4(w, group)
    ref_codes, ref_scale, ref_shift = quanto_int4(w.to(dtype), group)
    assert torch.equal(codes.to(torch.uint8).view(-1, group), ref_codes)  # the low byte is the code
    assert torch.equal(bits(scale), bits(ref_scale)) and torch.equal(bits(shift), bits(ref_shift))


def test_int4_one_group_per_row_and_non_finite_weights():
    w = awkward_weights(16, 96, torch.float16)  # 96 columns: one group per row (group = k)
    w[7, 5] = float("inf")
    w[8, 9] = float("nan")
    w[9, :] = float("-inf")
    codes, scale, shift = GroupQuantizer(torch.bfloat16, CPU, 1 << 12).int4(w, 96)
    ref_codes, ref_scale, ref_shift = quanto_int4(w.to(torch.bfloat16), 96)
    assert torch.equal(codes.to(torch.uint8).view(-1, 96), ref_codes)
    assert torch.equal(bits(scale), bits(ref_scale)) and torch.equal(bits(shift), bits(ref_shift))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_equals_quanto_bit_for_bit(dtype):
    w = awkward_weights(24, 256, torch.float16)
    data, scale = GroupQuantizer(dtype, CPU, 1 << 16).int8(w)
    ref_data, ref_scale = quanto_int8(w.to(dtype))
    assert torch.equal(data, ref_data) and torch.equal(bits(scale), bits(ref_scale))


def test_a_block_of_rows_gives_the_rows_of_the_whole_tensor():
    """Groups run along a row, so quantizing rows [a, b) alone gives those rows of the whole result."""
    w = awkward_weights(64, 256, torch.float16, seed=3)
    q = GroupQuantizer(torch.bfloat16, CPU, 1 << 16)
    whole = [t.clone() for t in q.int4(w, 128)]
    part = q.int4(w[16:40], 128)
    assert torch.equal(part[0], whole[0][16:40])
    assert torch.equal(part[1], whole[1][32:80]) and torch.equal(part[2], whole[2][32:80])


def test_row_blocks_are_aligned_and_cover_the_rows():
    assert block_rows(200, 128, 64 * 128, 64) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert block_rows(10, 1 << 20, 1 << 20, 64) == [(0, 10)]  # never fewer rows than the alignment asks
    assert block_rows(5, 7, 1 << 20, 1) == [(0, 5)]


def test_each_thread_has_its_own_scratch_space():
    import threading

    here = for_thread(torch.bfloat16, CPU, 1000)
    assert for_thread(torch.bfloat16, CPU, 10) is here  # reused while big enough
    assert for_thread(torch.bfloat16, CPU, 5000).capacity >= 5000
    other = []
    t = threading.Thread(target=lambda: other.append(for_thread(torch.bfloat16, CPU, 10)))
    t.start()
    t.join()
    assert other[0] is not for_thread(torch.bfloat16, CPU, 10)

"""`cogbatch.model.quant.builders`: each tensor built from row blocks, in any order, equals quanto's freeze()."""

from __future__ import annotations

import pytest
import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor

import cogbatch.model.quant.builders as B
from cogbatch.model.quant.plan import LayerQuant
from cogbatch.model.quant.quantizer import Timings
from tests.unit.quant.helpers import flat, linear_layer, quanto_frozen

CPU = torch.device("cpu")


def build(builder: B.Builder, src: torch.Tensor, reverse: bool = True) -> torch.Tensor:
    """Fill every block (last first: blocks must not depend on their order), then finish."""
    times = Timings()
    blocks = builder.blocks()
    for a, b in reversed(blocks) if reverse else blocks:
        builder.fill(src, a, b, times)
    return builder.finish()


@pytest.mark.parametrize(("n", "k"), [(256, 256), (192, 384), (208, 128)])
def test_tinygemm_cpu_builder_equals_quanto(n, k, monkeypatch):
    monkeypatch.setattr(B, "BLOCK_ELEMENTS", 64 * k)  # several blocks; 208 rows end in a 16-row tail
    lin = linear_layer(n, k)
    src = lin.weight.detach().to(torch.float16)  # what a checkpoint holds; the load computes in bf16
    lin.weight.data = src.to(torch.bfloat16)
    ref = quanto_frozen(lin, qint4).weight
    builder = B.linear_builder(LayerQuant("int4", 128), "tinygemm-cpu", (n, k), torch.bfloat16, CPU)
    assert isinstance(builder, B.TinyGemmCPUBuilder) and len(builder.blocks()) > 1
    w = build(builder, src)
    assert type(w) is TinyGemmWeightQBitsTensor
    assert all(torch.equal(x, y) for x, y in zip(flat(w), flat(ref), strict=True))


@pytest.mark.parametrize(("group", "dtype"), [(64, torch.bfloat16), (128, torch.float16), (32, torch.float32)])
def test_portable_int4_builder_equals_quanto(group, dtype, monkeypatch):
    monkeypatch.setattr(B, "BLOCK_ELEMENTS", 40 * 256)  # blocks whose grouped rows straddle the packing's halves
    lin = linear_layer(150, 256).to(dtype)
    ref = quanto_frozen(lin, qint4, group).weight
    w = build(B.linear_builder(LayerQuant("int4", group), "fallback", (150, 256), dtype, CPU), lin.weight.detach())
    assert type(w) is type(ref) is WeightQBitsTensor
    assert all(torch.equal(x, y) for x, y in zip(flat(w), flat(ref), strict=True))


def test_int8_and_cast_builders_equal_quanto_and_a_cast(monkeypatch):
    monkeypatch.setattr(B, "BLOCK_ELEMENTS", 32 * 256)
    lin = linear_layer(100, 256)
    ref = quanto_frozen(lin, qint8).weight
    w = build(B.linear_builder(LayerQuant("int8", None), "int8", (100, 256), torch.bfloat16, CPU), lin.weight.detach())
    assert type(w) is WeightQBytesTensor
    assert all(torch.equal(x, y) for x, y in zip(flat(w), flat(ref), strict=True))
    src = torch.randn(70, 300).half()
    assert torch.equal(build(B.CastBuilder((70, 300), torch.bfloat16, CPU), src), src.to(torch.bfloat16))
    scalar = build(B.CastBuilder((), torch.bfloat16, CPU), torch.tensor(2.5).half())
    assert torch.equal(scalar, torch.tensor(2.5).bfloat16())

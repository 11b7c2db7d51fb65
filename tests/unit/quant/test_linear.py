"""`cogbatch.model.quant.linear`: dynamic dequantization, moving packed weights, dense copies the planner counts."""

from __future__ import annotations

import math

import pytest
import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.nn import QModuleMixin
from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from torch import nn

import cogbatch.model.quant.linear as QL
import cogbatch.model.quant.pack as QP
from cogbatch.model.quant.linear import DequantQLinear
from tests.unit.quant.helpers import (
    flat,
    job_with,
    linear_layer,
    load,
    logits,
    quanto_frozen,
)


@pytest.mark.parametrize(("kind", "n", "k"), [("int4", 256, 512), ("int4", 208, 256), ("int8", 256, 512)])
def test_dynamic_dequant_matches_fused_path(kind, n, k):
    lin = linear_layer(n, k)
    q = quanto_frozen(lin, qint4 if kind == "int4" else qint8)
    x = torch.randn(300, k, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        q.dequant_threshold = None
        fused = q(x).float()
        q.dequant_threshold = 64
        dense = q(x).float()
        small = q(x[:10]).float()
        exact = lin(x).float()
    assert not torch.equal(dense, fused)  # the dense path really ran
    assert torch.equal(small, fused[:10])  # below the threshold: the fused kernel
    scale = exact.abs().max()
    quant_err = (fused - exact).abs().max() / scale
    path_err = (dense - fused).abs().max() / scale
    # int4: well inside the quantization error; int8 (error ~1%): within a few bf16 output roundings
    bound = quant_err / 2 if kind == "int4" else 4 * 2**-8
    assert path_err < bound, (float(path_err), float(quant_err))
    if kind == "int4":  # the dense weight is exactly the quantized weight (fp32 matmul of it = fused output)
        w = QL.dense_weight(q.weight, torch.float32)
        ref = (x.float() @ w.t() + q.bias.float()).to(torch.bfloat16).float()
        assert (ref - fused).abs().max() / scale < 0.01


def test_dense_weight_decodes_tinygemm_exactly():
    for n, k in [(256, 256), (208, 384)]:
        q = quanto_frozen(linear_layer(n, k), qint4)
        portable = q.weight.weight_qbits_tensor()  # quanto's own (slow) way back
        codes = QP._decode_tinygemm_cpu(q.weight._data._data, n, k, *QP.tinygemm_cpu_layout())
        assert torch.equal(codes, portable._data.unpack().view(n, k))
        dense = QL.dense_weight(q.weight, torch.float32)
        torch.testing.assert_close(dense, portable.dequantize().float(), atol=2e-2, rtol=1e-2)


def test_model_logits_with_dynamic_dequant_stay_close(ckpt, cache_dir):
    fused = logits(load(ckpt, "int4", cache_dir, dequant_threshold=math.inf))
    model = load(ckpt, "int4", cache_dir, dequant_threshold=0)
    assert model.load_report.dequant_threshold == 0
    dense = logits(model)
    assert (dense - fused).abs().max() / fused.abs().max() < 0.05
    cos = torch.nn.functional.cosine_similarity(dense.flatten(0, 1), fused.flatten(0, 1), dim=-1)
    assert cos.min() > 0.999


def test_move_module_copies_packed_weights_without_repacking(monkeypatch):
    """Phase swapping parks layers in host memory; `.to()` would unpack TinyGemm through an identity matmul."""
    model = nn.Sequential(linear_layer(256, 256), linear_layer(256, 256))
    model[0] = quanto_frozen(model[0], qint4)
    model[1] = quanto_frozen(model[1], qint8)

    def no_repack(*args, **kwargs):
        raise AssertionError("the packed weight was converted")

    monkeypatch.setattr(TinyGemmWeightQBitsTensor, "weight_qbits_tensor", no_repack)
    before = {n: [t.clone() for t in flat(p)] for n, p in model.named_parameters()}
    QL.move_module(model, "meta")  # another device: every inner tensor must travel as it is
    for name, p in model.named_parameters():
        assert p.device.type == "meta"
        assert [(t.shape, t.dtype) for t in flat(p)] == [(t.shape, t.dtype) for t in before[name]], name
    assert type(model[0].weight) is TinyGemmWeightQBitsTensor and type(model[1].weight) is WeightQBytesTensor
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    cpu = QL.move_module(nn.Sequential(quanto_frozen(linear_layer(256, 256), qint4)), "cpu")
    with torch.no_grad():
        assert torch.isfinite(cpu(x)).all()


def test_dequant_threshold_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert QL.resolve_dequant_threshold(None, cpu) == QL.DEFAULT_DEQUANT_THRESHOLD["cpu"]
    assert QL.resolve_dequant_threshold(math.inf, cpu) is None
    assert QL.resolve_dequant_threshold(128, cpu) == 128
    assert QL.resolve_dequant_threshold({"cpu": 64, "cuda": None}, cpu) == 64
    assert QL.resolve_dequant_threshold({"cpu": 64, "cuda": None}, cuda) is None
    with pytest.raises(ValueError):
        QL.resolve_dequant_threshold(-1, cpu)


@pytest.mark.parametrize(
    ("value", "expected", "on_cpu"),
    [
        ("absent", None, QL.DEFAULT_DEQUANT_THRESHOLD["cpu"]),
        (64, 64, 64),
        (None, math.inf, None),  # null: never, fused kernels for every call
        ({"cpu": 32, "cuda": 1024}, {"cpu": 32, "cuda": 1024}, 32),
        ({"cpu": None}, {"cpu": None}, None),
    ],
)
def test_job_dequant_threshold_reaches_the_loaded_model(tmp_path, value, expected, on_cpu):
    spec = {"default": "int8"} if value == "absent" else {"default": "int8", "dequant_threshold": value}
    cfg = job_with(tmp_path, spec)
    assert cfg.quantization.dequant_threshold == expected
    model = cfg.source.load()
    assert model.load_report.dequant_threshold == on_cpu
    layers = [m for m in model.modules() if isinstance(m, DequantQLinear)]
    assert layers and all(m.dequant_threshold == on_cpu for m in layers)


def test_the_memory_model_counts_the_largest_dense_copy_of_a_quantized_weight(ckpt, cache_dir):
    """The vision tower's group-64 layers dequantize their whole weight on every call (quanto's
    fallback), the TinyGemm layers only above `dequant_threshold` rows: the batch planner adds the
    largest such copy to each phase's peak (CogVLM2's lm_head would be 1 GiB on a pre-Ampere GPU)."""
    from cogbatch.planning.memory import memory_model_for

    model = load(ckpt, "int4", cache_dir)
    dense_bytes = QL._dense_dtype(torch.device("cpu"), torch.bfloat16).itemsize
    fallback = [m for m in model.model.vision.modules() if type(getattr(m, "weight", None)) is WeightQBitsTensor]
    assert fallback and isinstance(model.lm_head.weight, TinyGemmWeightQBitsTensor)
    largest_fallback = max(m.out_features * m.in_features * 2 for m in fallback)  # bf16 copies, whatever the rows
    vision = set(model.model.vision.modules())
    language = [m for m in model.modules() if isinstance(m, QModuleMixin) and m not in vision]
    with_threshold = memory_model_for(model)
    assert with_threshold.dense_language == max(m.out_features * m.in_features * dense_bytes for m in language)
    assert with_threshold.dense_vision >= largest_fallback

    QL.set_dequant_threshold(model, None)  # TinyGemm for every call: no copies but the fallback's
    fused = memory_model_for(model)
    assert (fused.dense_language, fused.dense_vision) == (0, largest_fallback)
    grown = with_threshold.decode_peak(2, 32, 8, True) - fused.decode_peak(2, 32, 8, True)
    assert grown == with_threshold.dense_language

"""`cogbatch.model.quant.pack`: block-wise quantization and packing, bit-identical to quanto, no compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from optimum.quanto import qint4
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor

import cogbatch.model.quant.pack as QP
from tests.unit.quant.helpers import (
    linear_layer,
    quanto_frozen,
)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (64, 128), (333, 17)])
def test_pure_unpack_is_bit_identical_to_quanto_reference(bits, shape):
    def quanto_reference(t: torch.Tensor, bits: int) -> torch.Tensor:
        """quanto's Python `default` kernel (library/unpack.py), skipping the CPU kernel registered over it."""
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        return torch.ops.quanto.unpack.default.redispatch(keys, t, bits)

    packed = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = QP.unpack_pure(packed, bits)
    assert ours.dtype == torch.uint8
    assert torch.equal(ours, quanto_reference(packed, bits))
    assert torch.equal(torch.ops.quanto.unpack(packed, bits), ours)  # the CPU kernel that runs is ours


@pytest.mark.parametrize(("n", "k"), [(256, 256), (192, 384), (208, 128)])
def test_block_encoder_and_blockwise_repack_equal_torchs_packer(n, k, monkeypatch):
    """Our CPU encoder (from the quantizer's 16-bit codes) and the block-wise portable -> TinyGemm repack
    give the bytes of torch's own `_convert_weight_to_int4pack_for_cpu` (what quanto's freeze() calls)."""
    monkeypatch.setattr(QP, "REPACK_CHUNK_ELEMENTS", 64 * k)  # several blocks even for small layers
    lin = linear_layer(n, k)
    ref = quanto_frozen(lin, qint4).weight
    assert type(ref) is TinyGemmWeightQBitsTensor
    codes = torch.randint(0, 16, (n, k), dtype=torch.int16, generator=torch.Generator().manual_seed(3))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), innerKTiles=2)
    layout = QP.tinygemm_cpu_layout()
    out = torch.empty((n, k // 2), dtype=torch.uint8)
    QP.encode_tinygemm_cpu(codes + 0x4300, out, *layout)  # the low byte holds the code, as in bf16 128 + code
    assert torch.equal(out, packed)
    portable = quanto_frozen(lin, qint4, optimized=False).weight
    again = QP._to_tinygemm(portable)
    assert torch.equal(again._data._data, ref._data._data) and torch.equal(again._scale_shift, ref._scale_shift)


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_int4_layout_is_recognised_for_each_isa(capability):
    """torch's CPU int4 packing differs per vector ISA; each must be decoded (not guessed)."""
    code = textwrap.dedent("""
        import torch
        from cogbatch.model.quant.pack import tinygemm_cpu_layout, _decode_tinygemm_cpu, _encode_tinygemm_cpu
        layout = tinygemm_cpu_layout()
        assert layout is not None, torch.backends.cpu.get_cpu_capability()
        for n, k in [(64, 128), (96, 256), (1040, 128)]:
            w = torch.randint(0, 16, (n, k), dtype=torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(w, innerKTiles=2)
            assert torch.equal(_decode_tinygemm_cpu(packed, n, k, *layout), w.to(torch.uint8))
            assert torch.equal(_encode_tinygemm_cpu(w.to(torch.uint8), *layout), packed)
        print(torch.backends.cpu.get_cpu_capability(), layout)
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

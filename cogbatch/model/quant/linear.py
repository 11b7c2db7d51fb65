"""Quantized Linears at run time: dynamic dequantization, kernel classes, moving packed weights.

`DequantQLinear` is quanto's `QLinear` plus one decision per call: few rows go through the fused
int4/int8 kernel, many rows (CogVLM's 1.2k-2.3k-token image prefill) through a transient dense copy
of the weight, because TinyGemm's cost grows with rows much faster than a dense GEMM's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from optimum.quanto.nn import QLinear, QModuleMixin
from optimum.quanto.tensor import QTensor, WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from torch import nn

from cogbatch.model.quant.pack import _decode_tinygemm_cpu, tinygemm_cpu_layout

# Calls with more rows than this use a transient dense weight instead of the fused int4 kernel.
# CPU: `scripts/bench_quant.py --crossover-only` (1-1024 rows, CogVLM2's shapes, 2-vCPU Zen AVX-512-BF16,
# noisy shared machine) has the dense path (dequantize + bf16 GEMM) overtaking TinyGemm from 192-256 rows
# on the language layers and 384 on the vision fc1; at 256 a whole decoder layer is faster dense. It
# also suits AVX2 CPUs, where the dense GEMM runs in fp32 (measured: fp32 wins from ~256 rows).
# CUDA: TinyGemm's CUDA tile layout has no decoder here (and no GPU to measure on): fused always.
DEFAULT_DEQUANT_THRESHOLD: dict[str, float | None] = {"cpu": 256, "cuda": None}


# --------------------------------------------------------------------------------------------
# dense copies of quantized weights (dynamic dequantization)


def _tinygemm_cpu_dense(w: TinyGemmWeightQBitsTensor, dtype: torch.dtype, rows: int = 256) -> torch.Tensor | None:
    """The dense (n, k) weight of a CPU TinyGemm tensor, `rows` rows at a time through an fp32 buffer.

    TinyGemm computes w = (q - 8) * scale + mid-point shift per group; this computes the same value
    as q * scale + (shift - 8 * scale) in fp32. Decoding, conversion and the transpose out of
    TinyGemm's column-major blocks are one strided copy per nibble; the small fp32 buffer stays in
    cache, so the whole thing is a few passes over the output. None if the layout is unknown.
    """
    layout = tinygemm_cpu_layout()
    packed = w._data._data
    if layout is None or packed.device.type != "cpu":
        return None
    block, mode = layout
    n, k = w.shape
    g = w._group_size
    flat = packed.reshape(-1)
    ss = w._scale_shift  # (k/g, n, 2)
    scale = ss[:, :, 0].t().float().unsqueeze(-1)  # (n, k/g, 1)
    zero = ss[:, :, 1].t().float().unsqueeze(-1) - 8 * scale
    out = torch.empty((n, k), dtype=dtype)
    rows = max(block, rows // block * block)
    buf = torch.empty((rows, k), dtype=torch.float32)
    full = n // block * block
    for n0 in range(0, full, rows):
        n1 = min(n0 + rows, full)
        p = flat[n0 * k // 2 : n1 * k // 2].view((n1 - n0) // block, k, block // 2)
        t = buf[: n1 - n0].view((n1 - n0) // block, block, k)
        lo, hi = (t[:, : block // 2], t[:, block // 2 :]) if mode == "halves" else (t[:, 0::2], t[:, 1::2])
        lo.copy_((p & 0x0F).transpose(1, 2))
        hi.copy_((p >> 4).transpose(1, 2))
        buf[: n1 - n0].view(n1 - n0, k // g, g).mul_(scale[n0:n1]).add_(zero[n0:n1])
        out[n0:n1] = buf[: n1 - n0]
    if full < n:  # last partial block: row pairs
        codes = _decode_tinygemm_cpu(flat[full * k // 2 :], n - full, k, block, "pairs").float()
        out[full:] = codes.view(n - full, k // g, g).mul_(scale[full:]).add_(zero[full:]).view(n - full, k)
    return out


def dense_weight(w: QTensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A dense `dtype` copy of a quantized weight, cheaply, or None if that is not possible here.

    None for TinyGemm on CUDA (its tile layout has no decoder here: the identity-matmul way quanto
    uses is O(K^2 N)) and for plain `WeightQBitsTensor`, whose fused path already is dequantize +
    dense matmul.
    """
    if isinstance(w, TinyGemmWeightQBitsTensor):
        return _tinygemm_cpu_dense(w, dtype)
    if type(w) is WeightQBitsTensor:
        return None
    return w.dequantize().to(dtype)


def _dense_dtype(device: torch.device, act_dtype: torch.dtype) -> torch.dtype:
    """fp32 on CPUs without native bf16 GEMM (AVX2 emulates it, ~6x slower), else the activation dtype."""
    if device.type == "cpu" and act_dtype in (torch.bfloat16, torch.float16):
        if act_dtype == torch.bfloat16 and _cpu_has_bf16_gemm():
            return act_dtype
        return torch.float32
    return act_dtype


def _cpu_has_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class DequantQLinear(QLinear):
    """quanto's QLinear, plus dynamic dequantization: calls with more rows than `dequant_threshold`
    multiply by a transient dense copy of the weight (dropped right after), fewer use the fused kernel.

    TinyGemm's cost grows with rows much faster than a dense GEMM's, and CogVLM's image prefill runs
    1.2k-2.3k rows through every layer. `dequant_threshold=None` means fused always. Created only by
    this module's loader, by name, so that the model code never knows it is quantized.
    """

    dequant_threshold: float | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        threshold = self.dequant_threshold
        if threshold is not None and isinstance(self.weight, QTensor) and input.numel() > threshold * self.in_features:
            dtype = _dense_dtype(input.device, input.dtype)
            dense = dense_weight(self.weight, dtype)
            if dense is not None:
                bias = None if self.bias is None else self.bias.to(dtype)
                return F.linear(input.to(dtype), dense, bias).to(input.dtype)
        return super().forward(input)


def largest_dense_copy(modules: Iterable[nn.Module], act_dtype: torch.dtype) -> int:
    """Bytes of the largest dense weight copy that one call of a quantized Linear among `modules` makes.

    quanto's dequantize fallback (plain `WeightQBitsTensor`: pre-Ampere GPUs, groups other than 128)
    and its int8 path on CUDA expand the whole weight on every call; dynamic dequantization does for
    inputs above `dequant_threshold` rows, where `dense_weight` can (not for TinyGemm on CUDA). The
    planner adds it to a phase's transient memory: CogVLM2's lm_head is 1 GiB dense in 16 bits.
    """
    best = 0
    for m in modules:
        w = getattr(m, "weight", None)
        if not (isinstance(m, QModuleMixin) and isinstance(w, QTensor)):
            continue
        cuda = w.device.type == "cuda"
        if type(w) is WeightQBitsTensor or (type(w) is WeightQBytesTensor and cuda):
            nbytes = act_dtype.itemsize
        elif getattr(m, "dequant_threshold", None) is not None and not (
            cuda and isinstance(w, TinyGemmWeightQBitsTensor)
        ):
            nbytes = _dense_dtype(w.device, act_dtype).itemsize
        else:
            continue
        best = max(best, m.out_features * m.in_features * nbytes)
    return best


def resolve_dequant_threshold(value: Any, device: torch.device) -> float | None:
    """None -> the device default; a number -> that (math.inf = never); a dict {device type: number | None}."""
    if isinstance(value, Mapping):
        value = value.get(device.type, DEFAULT_DEQUANT_THRESHOLD.get(device.type))
        if value is None:
            return None
    elif value is None:
        value = DEFAULT_DEQUANT_THRESHOLD.get(device.type)
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"dequant_threshold must be a row count >= 0, math.inf or None, got {value!r}")
    return None if math.isinf(value) else float(value)


def set_dequant_threshold(model: nn.Module, threshold: float | None) -> int:
    """Set the dynamic-dequantization threshold of every quantized Linear; returns how many there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, DequantQLinear):
            m.dequant_threshold = threshold
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# kernel classes and moving packed weights


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """Quantized Linears per weight class: the class decides which kernel runs."""
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, QModuleMixin) and isinstance(m.weight, QTensor):
            counts[type(m.weight).__name__] += 1
    return dict(sorted(counts.items()))


def _move_raw(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` with quantized (sub)tensors rebuilt from their moved inner tensors, layout unchanged."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return t.detach().to(device)
    names, meta = flatten()
    inner = {n: _move_raw(getattr(t, n), device) for n in names}
    return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())


def move_module(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Move a module, quantized weights included, by copying their inner tensors as they are.

    `module.to(device)` makes quanto convert a TinyGemm weight back to its portable layout and repack
    it on the other side (an O(K^2 N) identity matmul: 51 s for one 4096x11008 layer on CPU). For
    parking weights in host memory between phases and bringing them back, the packed bytes can simply
    be copied; a weight parked this way is only meant to return to a
    device of its original type (its packing is that device's). Tensors still on `meta` (a load
    parks a module as soon as its weight is made, before its bias is read) stay there.
    """
    device = torch.device(device)
    with torch.no_grad():
        for m in module.modules():
            for name, param in m._parameters.items():
                if param is not None and param.device != device and not param.is_meta:
                    m._parameters[name] = nn.Parameter(_move_raw(param, device), requires_grad=param.requires_grad)
            for name, buf in m._buffers.items():
                if buf is not None and buf.device != device and not buf.is_meta:
                    m._buffers[name] = buf.to(device)
    return module

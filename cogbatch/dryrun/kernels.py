"""What the CUDA build would run where the CPU build differs: SDPA's backend choice, the int4 kernels' checks.

* **SDPA.** On the CPU build `F.scaled_dot_product_attention` of fake cuda tensors finds no CUDA
  backend chooser and runs the math kernel: full fp32 score matrices (20 GiB for CogVLM2's vision
  tower at batch 4), a wrong memory picture. `SdpaMirror` chooses as
  aten/src/ATen/native/transformers/cuda/sdp_utils.cpp does with its default priority (flash, then
  memory-efficient, then math) and calls that backend's op, whose meta kernel gives its real output
  sizes. Flash: fp16/bf16 (bf16 from sm80), sm80 to sm121, no mask, head dim <= 256, `is_causal` only
  for square attention, GQA allowed. Memory-efficient: sm50 to sm121, mask allowed (padded to 16
  columns when not aligned, as the kernel does), head dim a multiple of 8 in 16 bits, no GQA (torch
  2.13 documents GQA for flash and math only), bf16 from sm80. Math: the composite kernel, which on
  CUDA upcasts 16-bit inputs to fp32 and expands grouped KV heads. cuDNN attention, which torch
  prefers on some sm90/sm100 setups with a recent cuDNN, is not mirrored.
* **int4.** The meta kernels of `_convert_weight_to_int4pack` and `_weight_int4pack_mm` check ranks
  and dtypes only; `check_int4_op` adds the TORCH_CHECKs of aten/src/ATen/native/cuda/int4mm.cu
  (A bf16, contiguous, 2-D; B int32, contiguous, 4-D with k/(innerKTiles*16) tiles; group size
  32/64/128/256; scales-and-zeros (k/group, n, 2) in bf16; sm80 or newer) and fails as CUDA would.
* **AWQ.** quanto's fused fp16 int4 kernel (`quanto::gemm_f16i4_awq`, sm80+) exists only once its
  CUDA extension is built with nvcc; `awq_gemm` stands in for it with the checks of its Python
  wrapper and its output size, and `define_awq_op` declares the operator where quanto did not.
* **Counters** of the kernels that decide speed and memory: every int4/int8 packing and matmul op by
  name, SDPA calls by backend (and by phase, via `phase_of`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

aten = torch.ops.aten

# Ops worth counting by name (the others are only counted in total).
COUNTED_OPS = {
    "_convert_weight_to_int4pack": "int4",
    "_weight_int4pack_mm": "int4",
    "_convert_weight_to_int4pack_for_cpu": "int4",
    "_weight_int4pack_mm_for_cpu": "int4",
    "_weight_int8pack_mm": "int8",
    "_int_mm": "int8",
    "_scaled_dot_product_flash_attention": "sdpa",
    "_scaled_dot_product_efficient_attention": "sdpa",
    "_scaled_dot_product_attention_math": "sdpa",
}


class KernelCheckError(RuntimeError):
    """A CUDA kernel would refuse these arguments (a TORCH_CHECK that the meta kernel lacks)."""


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def check_int4_op(name: str, args: tuple, capability: tuple[int, int]) -> None:
    """Raise `KernelCheckError` where int4mm.cu's CUDA kernels would fail for these arguments."""
    p: list[str] = []
    if name == "_convert_weight_to_int4pack":
        w, inner = args[0], args[1]
        _check(p, w.dim() == 2, f"input must be 2-D, got {w.dim()}-D")
        _check(p, w.dtype == torch.uint8, f"input must be uint8, got {w.dtype}")
        _check(p, w.is_contiguous(), "input must be contiguous")
        _check(p, inner in (2, 4, 8), f"innerKTiles must be 2, 4 or 8, got {inner}")
        if w.dim() == 2:
            _check(p, (w.size(1) * 2) % (inner * 16) == 0, f"k = {w.size(1) * 2} is not a multiple of {inner * 16}")
            _check(p, w.size(0) % 8 == 0, f"n = {w.size(0)} is not a multiple of 8 (the meta kernel's shape differs)")
    elif name == "_weight_int4pack_mm":
        a, b, group, sz = args[0], args[1], args[2], args[3]
        _check(p, a.device == b.device == sz.device, "A, B and scales-and-zeros must be on one device")
        _check(p, a.dtype == torch.bfloat16, f"A must be bf16, got {a.dtype}")
        _check(p, a.is_contiguous(), "A must be contiguous")
        _check(p, a.dim() == 2, f"A must be 2-D, got {a.dim()}-D")
        _check(p, b.dtype == torch.int32, f"B must be int32, got {b.dtype}")
        _check(p, b.is_contiguous(), "B must be contiguous")
        _check(p, b.dim() == 4, f"B must be 4-D, got {b.dim()}-D")
        _check(p, group in (32, 64, 128, 256), f"group size must be 32/64/128/256, got {group}")
        _check(p, sz.dtype == torch.bfloat16, f"scales-and-zeros must be bf16, got {sz.dtype}")
        _check(p, sz.dim() == 3, f"scales-and-zeros must be 3-D, got {sz.dim()}-D")
        if a.dim() == 2 and b.dim() == 4:
            k, inner = a.size(1), b.size(3) * 2
            _check(p, inner in (2, 4, 8), f"B's innerKTiles must be 2, 4 or 8, got {inner}")
            if inner in (2, 4, 8):
                _check(
                    p,
                    b.size(1) == k // (inner * 16),
                    f"B has {b.size(1)} k-tiles, A's k = {k} needs {k // (inner * 16)}",
                )
            _check(p, b.size(2) == 32, f"B.size(2) must be 32, got {b.size(2)}")
            k_tiles = -(-k // 16) * 16
            _check(
                p, k_tiles >= group and k_tiles % group == 0, f"k = {k} is not a multiple of the group size {group}"
            )
            if sz.dim() == 3:
                _check(p, sz.size(1) == b.size(0) * 8 and sz.size(2) == 2,
                       f"scales-and-zeros {tuple(sz.shape)} do not match n = {b.size(0) * 8}")  # fmt: skip
    else:
        return
    _check(
        p,
        capability >= (8, 0),
        f"the CUDA int4 kernels need sm80 or newer (device is sm{capability[0]}{capability[1]})",
    )
    if p:
        raise KernelCheckError(f"{name} (CUDA): " + "; ".join(p))


AWQ_SCHEMA = ("(Tensor input, Tensor other, Tensor other_scale, Tensor other_shift, int rows, int out_cols, "
              "int in_cols, int bits, int group_size) -> Tensor")  # fmt: skip


def define_awq_op() -> None:
    """Declare `quanto::gemm_f16i4_awq` as quanto's CUDA extension does when CUDA is present at import."""
    if not hasattr(torch.ops.quanto, "gemm_f16i4_awq"):
        torch.library.define("quanto::gemm_f16i4_awq", AWQ_SCHEMA)


def awq_gemm(x: torch.Tensor, other: torch.Tensor, scales: torch.Tensor, shift: torch.Tensor, rows: int,
             out_cols: int, in_cols: int, bits: int, group_size: int) -> torch.Tensor:  # fmt: skip
    """The AWQ kernel's result for fake tensors, after the checks of quanto's wrapper (library/extensions/cuda)."""
    p: list[str] = []
    _check(p, out_cols >= 128, f"out_cols {out_cols} < 128")
    _check(p, x.dtype == torch.float16, f"input must be fp16, got {x.dtype}")
    _check(p, x.numel() == rows * in_cols, f"input has {x.numel()} elements, not rows x in_cols = {rows * in_cols}")
    _check(p, other.dtype == torch.int16, f"packed weight must be int16, got {other.dtype}")
    _check(p, scales.dtype == torch.float16 and scales.shape[-1] == out_cols, "scales must be fp16 (.., out_cols)")
    _check(p, shift.dtype == torch.float16 and shift.shape[-1] == out_cols, "shift must be fp16 (.., out_cols)")
    _check(p, bits == 4 and group_size == 128, f"bits {bits}, group {group_size}: only 4 and 128")
    if p:
        raise KernelCheckError("quanto gemm_f16i4_awq (CUDA): " + "; ".join(p))
    return x.new_empty((*x.shape[:-1], out_cols))


# quanto operators whose only kernels are compiled CUDA code: what runs in their place on fake tensors.
FAKE_QUANTO_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"gemm_f16i4_awq": awq_gemm}


class SdpaMirror:
    """`F.scaled_dot_product_attention` for fake cuda tensors, on the backend CUDA would choose."""

    def __init__(self, capability: tuple[int, int], phase_of: Callable[[], str | None] = lambda: None) -> None:
        self.capability = capability
        self.phase_of = phase_of
        self.calls: Counter[str] = Counter()
        self.by_phase: Counter[tuple[str, str]] = Counter()
        self.reasons: Counter[str] = Counter()  # why the first choice was refused, for the report
        self.original = F.scaled_dot_product_attention

    def choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, is_causal: bool,
               enable_gqa: bool) -> tuple[str, str]:  # fmt: skip
        """(backend, why not flash) following sdp_utils.cpp's filters, default settings, inference."""
        cap = self.capability
        four_d = q.dim() == k.dim() == v.dim() == 4
        hd_q, hd_k, hd_v = q.size(-1), k.size(-1), v.size(-1)
        half = q.dtype in (torch.float16, torch.bfloat16)
        dtype_ok = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and cap >= (8, 0))
        same_heads = q.size(-3) == k.size(-3) == v.size(-3)
        gqa_ok = enable_gqa and q.size(-3) % k.size(-3) == 0 and k.size(-3) == v.size(-3)
        nonzero = all(t.size(-2) > 0 for t in (q, k, v))
        strides = all(t.stride(-1) == 1 or t.size(-1) == 1 for t in (q, k, v))
        flash_refusal = (
            "sm < 8.0" if not (8, 0) <= cap <= (12, 1)
            else "attention mask" if mask is not None
            else "dtype" if not (half and dtype_ok)
            else "head dim" if not (hd_q == hd_k == hd_v <= 256)
            else "causal non-square" if is_causal and q.size(-2) != k.size(-2)
            else "4-D" if not four_d
            else "heads" if not (same_heads or gqa_ok)
            else "empty" if not nonzero
            else "stride" if not strides
            else None
        )  # fmt: skip
        if flash_refusal is None:
            return "flash", ""
        align = 8 if half else (4 if cap >= (8, 0) else 1)
        mem_dtype = q.dtype in (torch.float16, torch.float32) or (q.dtype == torch.bfloat16 and cap >= (8, 0))
        efficient = (
            (5, 0) <= cap <= (12, 1)
            and four_d
            and hd_q == hd_k
            and hd_q % align == 0
            and hd_v % align == 0
            and same_heads
            and nonzero
            and all(t.stride(-1) == 1 for t in (q, k, v))
            and mem_dtype
            and q.dtype == k.dtype == v.dtype
            and not (is_causal and mask is not None)
        )
        return ("efficient" if efficient else "math"), flash_refusal

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
        if query.device.type != "cuda":
            return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa)  # fmt: skip
        backend, refusal = self.choose(query, key, value, attn_mask, is_causal, enable_gqa)
        self.calls[backend] += 1
        self.by_phase[(self.phase_of() or "-", backend)] += 1
        if refusal:
            self.reasons[f"{backend} (flash refused: {refusal})"] += 1
        if backend == "flash":
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                            scale=scale)[0]  # fmt: skip
        if backend == "efficient":
            bias = attn_mask
            if bias is not None:
                if bias.dtype == torch.bool:  # the kernel takes an additive bias
                    bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill_(
                        ~bias, -math.inf
                    )
                if bias.size(-1) % 16 or bias.stride(-1) != 1:  # pad_bias: a copy, 16 columns aligned
                    cols = -(-bias.size(-1) // 16) * 16
                    padded = torch.empty((*bias.shape[:-1], cols), dtype=bias.dtype, device=bias.device)
                    padded[..., : bias.size(-1)] = bias
                    bias = padded[..., : attn_mask.size(-1)]
                bias = bias.expand(query.size(0), query.size(1), query.size(2), key.size(2))
            return aten._scaled_dot_product_efficient_attention(query, key, value, bias, False, dropout_p,
                                                                 is_causal, scale=scale)[0]  # fmt: skip
        return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)  # fmt: skip

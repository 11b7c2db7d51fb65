"""Online INT4 / INT8 quantization while loading, per-module rules, the quantized-weights cache, the load report.

Why it looks like this (the measured facts are in `../shared/QUANTO_NOTES.md`):

* **Streaming.** The fp16 checkpoint of CogVLM2-19B is ~38 GB and its INT4 weights ~10 GB, so the
  full-precision model must never be resident. The model is built on `meta`; every Linear that a rule
  quantizes becomes a quanto `QLinear` while still on meta, and its checkpoint weight is read a block
  of rows at a time, cast to the compute dtype, quantized with quanto's own optimizer and ops, and
  packed straight into its final buffer. Peak memory is the quantized model plus a few MB, even for a
  128256-row `lm_head` (whole-tensor `freeze()` would need ~8 B/param of it transiently).
  Quantization is per row (groups run along the input dimension), so block-wise results are bit-identical
  to `quantize()` + `freeze()` on the whole float model; `tests/unit/test_quantize.py` checks it.
* **Portable layout for the cache.** What is written to the cache is quanto's kernel-agnostic layout,
  as each layer is produced; the device kernel's layout (TinyGemm / AWQ) is derived from it block by
  block (on CPU, bf16 group-128 blocks go straight from the codes to TinyGemm's layout). Converting
  a TinyGemm-packed weight back for saving would cost quanto's O(K^2 N) identity matmul.
* **Cache.** One safetensors file whose header is computed up front (every shape is known from the
  config), so tensors are written at their offsets as they are produced, plus a JSON sidecar with the
  key, quanto's quantization map, the group size per module (quanto does not record it) and our rules.
  Written into a temp dir and renamed; verified (key, sizes, tensor names, shapes, dtypes) before use;
  any doubt means a warning and quantizing again, never a crash and never wrong weights. Reloading
  builds the quantized skeleton on meta and assigns tensors; quanto's `requantize()` is not used (it
  materialises the whole float model on the device first).
* **No compiler.** quanto's CPU `unpack` is a C++ extension JIT-built on first use (~43 s, g++ and
  ninja, writes into site-packages). A pure-PyTorch unpack, bit-identical, is registered in its place.
* **Dynamic dequantization.** TinyGemm is fast for decode but slow for CogVLM's 1.2k–2.3k-token
  prefills; above `dequant_threshold` rows a layer multiplies by a transient dense copy of its weight.
* Modules stay oblivious: decisions are made here, by module name, and installed from outside
  (quanto module swap, a `QLinear` subclass, forward hooks for the CPU embedding table).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from optimum.quanto import qint4, qint8
from optimum.quanto.nn import QLinear, QModuleMixin
from optimum.quanto.quantize import quantization_map, set_module_by_name
from optimum.quanto.tensor import AbsmaxOptimizer, MaxOptimizer, QTensor, WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.packed import PackedTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor
from torch import nn

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.weights import DERIVED_SUFFIXES, LazyTensor, stream_lazy_tensors

log = logging.getLogger("cogbatch.model.quantize")

QDTYPES = ("int4", "int8", "none")
GROUP_SIZES = (32, 64, 128)
_QTYPES = {"int4": qint4, "int8": qint8}
# nn.Embedding modules: their 2-D weights are tables, never Linear weights.
_EMBEDDING_SUFFIXES = ("embed_tokens", "position_embedding")
# Elements of a weight quantized per step: quantization makes ~8 temporaries of a block, so blocks stay
# small (the transient memory of a load is a few MB). Repacking (uint8 only, two temporaries) takes bigger ones.
CHUNK_ELEMENTS = 1 << 19
REPACK_CHUNK_ELEMENTS = 1 << 22
# Calls with more rows than this use a transient dense weight instead of the fused int4 kernel.
# CPU: scripts/bench_quant.py measured the dense path (dequantize + bf16 GEMM) overtaking TinyGemm from
# 192-384 rows on 4096x4096 and 14336x4096 (2-core Zen AVX-512-BF16, noisy shared machine); 256 sits in
# between and also suits AVX2 CPUs, where the dense GEMM runs in fp32 (QUANTO_NOTES: fp32 wins from ~256).
# CUDA: not measured (no GPU here) and TinyGemm's CUDA packing has no fast decoder here: fused always.
DEFAULT_DEQUANT_THRESHOLD: dict[str, float | None] = {"cpu": 256, "cuda": None}

CACHE_FORMAT = 1
CACHE_WEIGHTS = "model.safetensors"
CACHE_SIDECAR = "quant.json"


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class QuantRule:
    """Module names matching `pattern` (fnmatch glob) get `dtype`; `group_size` overrides the default for int4."""

    pattern: str
    dtype: str
    group_size: int | None = None


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize: a default for every Linear, rules (first match wins), and placement options.

    Only `nn.Linear` layers are ever quantized: embeddings, norms and convolutions keep the compute
    dtype whatever the rules say. `embeddings_on_cpu` keeps the token embedding table in host memory
    (CogVLM2's is 1 GB in bf16); it changes placement, not weights, so it is not part of the cache key.
    """

    default: str = "int4"
    group_size: int = 128
    rules: tuple[QuantRule, ...] = ()
    embeddings_on_cpu: bool = False

    def __post_init__(self) -> None:
        _check_dtype(self.default, "quantization.default")
        _check_group(self.group_size, "quantization.group_size")
        for i, r in enumerate(self.rules):
            _check_dtype(r.dtype, f"quantization.rules[{i}].dtype")
            if r.group_size is not None:
                _check_group(r.group_size, f"quantization.rules[{i}].group_size")

    @classmethod
    def parse(cls, spec: Any) -> QuantConfig | None:
        """None for no quantization; accepts None/"none", "int4", "int4-g32", "int8", a dict or a QuantConfig."""
        if spec is None or isinstance(spec, QuantConfig):
            return spec
        if isinstance(spec, str):
            dtype, group = _parse_dtype(spec, "quantization")
            if dtype == "none":
                return None
            return cls(default=dtype, group_size=group or 128)
        if not isinstance(spec, Mapping):
            raise ValueError(f"quantization: expected a string, a mapping or None, got {type(spec).__name__}")
        unknown = set(spec) - {"default", "group_size", "rules", "embeddings_on_cpu"}
        if unknown:
            raise ValueError(f"quantization: unknown key(s) {', '.join(sorted(unknown))}")
        default, group = _parse_dtype(spec.get("default", "int4"), "quantization.default")
        if "group_size" in spec:
            group = spec["group_size"]
        rules = []
        raw_rules = spec.get("rules") or []
        if not isinstance(raw_rules, (list, tuple)):
            raise ValueError("quantization.rules: expected a list of {pattern, dtype} mappings")
        for i, r in enumerate(raw_rules):
            key = f"quantization.rules[{i}]"
            if isinstance(r, QuantRule):
                rules.append(r)
                continue
            if not isinstance(r, Mapping) or "pattern" not in r or "dtype" not in r:
                raise ValueError(f"{key}: expected a mapping with pattern and dtype")
            extra = set(r) - {"pattern", "dtype", "group_size"}
            if extra:
                raise ValueError(f"{key}: unknown key(s) {', '.join(sorted(extra))}")
            rdtype, rgroup = _parse_dtype(r["dtype"], f"{key}.dtype")
            rules.append(QuantRule(str(r["pattern"]), rdtype, r.get("group_size", rgroup)))
        embeddings_on_cpu = spec.get("embeddings_on_cpu", False)
        if not isinstance(embeddings_on_cpu, bool):
            raise ValueError("quantization.embeddings_on_cpu: expected true or false")
        config = cls(default, int(group or 128), tuple(rules), embeddings_on_cpu)
        if config.default == "none" and all(r.dtype == "none" for r in config.rules):
            return None if not config.embeddings_on_cpu else config
        return config

    def resolve(self, module_name: str) -> tuple[str, int | None]:
        """(dtype, requested int4 group size) of one Linear: the first matching rule, else the default."""
        for r in self.rules:
            if fnmatchcase(module_name, r.pattern):
                return r.dtype, (r.group_size or self.group_size) if r.dtype == "int4" else None
        return self.default, self.group_size if self.default == "int4" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default,
            "group_size": self.group_size,
            "rules": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rules],
            "embeddings_on_cpu": self.embeddings_on_cpu,
        }

    def key_dict(self) -> dict[str, Any]:
        """The part of the config that decides the weights (the cache key hashes it)."""
        d = self.to_dict()
        del d["embeddings_on_cpu"]
        return d

    def label(self) -> str:
        """Short label for result rows and logs: `int4-g128`, `int8`, `none`, with `+rules` when mixed."""
        base = f"int4-g{self.group_size}" if self.default == "int4" else self.default
        return base + ("+rules" if self.rules else "")


def _check_dtype(value: str, key: str) -> None:
    if value not in QDTYPES:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(QDTYPES)}")


def _check_group(value: Any, key: str) -> None:
    if value not in GROUP_SIZES or isinstance(value, bool):
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, GROUP_SIZES))}")


def _parse_dtype(value: Any, key: str) -> tuple[str, int | None]:
    """Split "int4-g64" into ("int4", 64) and "int8" into ("int8", None)."""
    m = re.fullmatch(r"(int4)(?:-g(\d+))?|int8|none", str(value).strip().lower())
    if not m:
        raise ValueError(f"{key}: {value!r} must be one of int4, int4-g32, int4-g64, int4-g128, int8, none")
    if m.group(1):
        group = int(m.group(2)) if m.group(2) else None
        if group is not None:
            _check_group(group, key)
        return "int4", group
    return m.group(0), None


# --------------------------------------------------------------------------------------------
# which module gets what


@dataclass(frozen=True)
class LayerPlan:
    qtype: str  # "int4" | "int8"
    group_size: int | None  # int4: effective group size (None = one group per row)


def linear_layers(cfg: CogVLMConfig) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the model as module name -> (out_features, in_features), from names and shapes only."""
    layers = {}
    for name, shape in checkpoint_tensor_shapes(cfg).items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and not module.endswith(_EMBEDDING_SUFFIXES):
            layers[module] = (shape[0], shape[1])
    return layers


def effective_group_size(in_features: int, group_size: int) -> int | None:
    """The requested group if it divides the row, else the largest power-of-two divisor below it (>= 8).

    Real CogVLM rows (1792, 4096, 11008, 14336, 15360) are multiples of 128; tiny test models are not.
    quanto would silently go per-channel there, which is much coarser. None = one group per row.
    """
    g = group_size
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def plan_layers(cfg: CogVLMConfig, quant: QuantConfig | None) -> dict[str, LayerPlan]:
    """Module name -> LayerPlan for every Linear that will be quantized (absent = kept in the compute dtype)."""
    if quant is None:
        return {}
    plan = {}
    for name, (_, in_features) in linear_layers(cfg).items():
        dtype, group = quant.resolve(name)
        if dtype == "int4":
            plan[name] = LayerPlan("int4", effective_group_size(in_features, group))
        elif dtype == "int8":
            plan[name] = LayerPlan("int8", None)
    return plan


def component_of(name: str) -> str:
    """vision / language / embeddings / lm_head, the split `cogbatch plan` reports."""
    if name.startswith("model.embed_tokens."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("model.vision."):
        return "vision"
    return "language"


def quantized_state_layout(
    shapes: Mapping[str, tuple[int, ...]], plan: Mapping[str, LayerPlan], dtype: torch.dtype
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """State-dict name -> (shape, dtype) of the model in quanto's portable layout, in checkpoint order.

    It is what the cache file holds and what the device holds (TinyGemm / AWQ repack the same bytes),
    so it serves both cache validation and `predict_weight_bytes`.
    """
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in shapes.items():
        if name.endswith(DERIVED_SUFFIXES):
            continue
        module, _, leaf = name.rpartition(".")
        lp = plan.get(module)
        if lp is None or leaf != "weight":
            out[name] = (tuple(shape), dtype)
            continue
        n, k = shape
        if lp.qtype == "int8":
            out[f"{module}.weight._data"] = ((n, k), torch.int8)
            out[f"{module}.weight._scale"] = ((n, 1), dtype)
        else:
            gs = lp.group_size or k
            rows = n * (k // gs)
            out[f"{module}.weight._data._data"] = (((rows + 1) // 2, gs), torch.uint8)
            out[f"{module}.weight._scale"] = ((rows, 1), dtype)
            out[f"{module}.weight._shift"] = ((rows, 1), dtype)
        out[f"{module}.input_scale"] = ((), dtype)
        out[f"{module}.output_scale"] = ((), dtype)
    return out


def _layout_category(name: str, dt: torch.dtype, plan: Mapping[str, LayerPlan]) -> str:
    module = name.split(".weight.", 1)[0] if ".weight." in name else None
    if module is not None and module in plan:
        return plan[module].qtype
    return f"{dt.itemsize * 8}-bit"


def predict_weight_bytes(
    cfg: CogVLMConfig, quant: QuantConfig | None, dtype: torch.dtype | str = torch.bfloat16
) -> dict[str, Any]:
    """Bytes of every weight under the rules, without building a model (feeds `cogbatch plan`).

    int4 gN: 0.5 B/param packed + a scale and a shift per group in the compute dtype; int8: 1 B/param
    + a scale per row; none: the compute dtype. Returns per component (`vision`, `language`,
    `embeddings`, `lm_head`), per category (`by_dtype`: int4 / int8 / 16-bit / 32-bit), `total`, and
    `device` / `host` (the token embeddings count as host with `embeddings_on_cpu`).
    """
    from cogbatch.model.cogvlm import resolve_dtype  # lazy: cogvlm imports this module lazily too

    dtype = resolve_dtype(dtype, torch.device("cpu")) if isinstance(dtype, str) else dtype
    plan = plan_layers(cfg, quant)
    layout = quantized_state_layout(checkpoint_tensor_shapes(cfg), plan, dtype)
    components: Counter[str] = Counter({"vision": 0, "language": 0, "embeddings": 0, "lm_head": 0})
    by_dtype: Counter[str] = Counter()
    for name, (shape, dt) in layout.items():
        nbytes = math.prod(shape) * dt.itemsize
        components[component_of(name)] += nbytes
        by_dtype[_layout_category(name, dt, plan)] += nbytes
    total = sum(components.values())
    host = components["embeddings"] if quant is not None and quant.embeddings_on_cpu else 0
    return {**components, "by_dtype": dict(by_dtype), "total": total, "device": total - host, "host": host}


# --------------------------------------------------------------------------------------------
# pure-PyTorch unpack


def unpack_pure(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's `unpack` (uint8 holding 8/bits values, packed along dim 0) in plain tensor ops.

    Same result as quanto's Python reference and its C++ extension: value i of each byte is
    `(byte >> bits*i) & mask`, and the i-th slice goes to rows [i*R, (i+1)*R).
    """
    if bits not in (2, 4):
        raise ValueError(f"can only unpack 2-bit or 4-bit values, got bits={bits}")
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


_UNPACK_LIB: torch.library.Library | None = None


def install_pure_unpack() -> None:
    """Replace quanto's CPU (and CUDA) `unpack` kernels, which JIT-compile C++/CUDA on first use.

    A reload (`optimize()`) and every call of the int4 fallback path unpack; with this, loading never
    needs g++/ninja/nvcc and never writes into site-packages. Idempotent.
    """
    global _UNPACK_LIB
    if _UNPACK_LIB is not None:
        return
    lib = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        for key in ("CPU", "CUDA"):
            lib.impl("unpack", unpack_pure, key, allow_override=True)
    _UNPACK_LIB = lib  # the registration lives as long as the Library object


install_pure_unpack()


# --------------------------------------------------------------------------------------------
# TinyGemm's CPU packing


_CPU_LAYOUTS = ((64, "halves"), (32, "halves"), (32, "pairs"))
_cpu_layout_cache: dict[str, tuple[int, str] | None] = {}


def _decode_tinygemm_cpu(packed: torch.Tensor, n: int, k: int, block: int, mode: str) -> torch.Tensor:
    """uint8 codes (n, k) from `_convert_weight_to_int4pack_for_cpu`'s layout.

    Rows come in blocks of `block` (64 with AVX-512, 32 otherwise); per block and input column there
    are block/2 bytes. "halves": byte j holds rows j (low nibble) and j + block/2 (high); "pairs"
    (no vector ISA, and the last partial block): rows 2j and 2j+1.
    """
    flat = packed.reshape(-1)
    full = n // block
    cut = full * block * k // 2
    parts = []
    if full:
        lo, hi = (flat[:cut] & 0x0F).view(full, k, block // 2), (flat[:cut] >> 4).view(full, k, block // 2)
        blk = torch.cat([lo, hi], 2) if mode == "halves" else torch.stack([lo, hi], 3).reshape(full, k, block)
        parts.append(blk.transpose(1, 2).reshape(full * block, k))  # (n_full, k)
    rest = n - full * block
    if rest:
        lo, hi = (flat[cut:] & 0x0F).view(k, rest // 2), (flat[cut:] >> 4).view(k, rest // 2)
        parts.append(torch.stack([lo, hi], 2).reshape(k, rest).t())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _encode_tinygemm_cpu(codes: torch.Tensor, block: int, mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `_decode_tinygemm_cpu`: (n, k) codes -> (n, k/2) bytes in torch's CPU int4 layout.

    Plain uint8 tensor ops (torch's packer wants int32 codes: 4 B/param of the layer); full blocks
    are written straight into `out` through a transposed view.
    """
    n, k = codes.shape
    out = torch.empty((n, k // 2), dtype=torch.uint8, device=codes.device) if out is None else out
    flat = out.view(-1)
    full = n // block
    cut = full * block * k // 2
    if full:
        c = codes[: full * block].view(full, block, k)
        lo, hi = (c[:, : block // 2], c[:, block // 2 :]) if mode == "halves" else (c[:, 0::2], c[:, 1::2])
        torch.bitwise_or(lo, hi << 4, out=flat[:cut].view(full, k, block // 2).transpose(1, 2))
    rest = n - full * block
    if rest:
        c = codes[full * block :]
        flat[cut:].view(k, rest // 2).copy_((c[0::2] | (c[1::2] << 4)).t())
    return out


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # every byte's low nibble, in an int64 lane
_HIGH_NIBBLES = ~_LOW_NIBBLES


def _portable_to_tinygemm_cpu(p: torch.Tensor, out_lo: torch.Tensor, out_hi: torch.Tensor, block: int, mode: str):
    """Both TinyGemm row blocks encoded in a block of portable bytes, without unpacking the codes.

    `p` (rows, k) holds row r of the first half in its low nibbles and row r + n/2 in its high ones;
    rows is a multiple of `block`. A TinyGemm byte pairs two rows of one half, so it is
    (x & 0xF) | (y << 4) for the first half and (x >> 4) | (y & 0xF0) for the second: computed on
    int64 lanes (8 bytes per element; the masks keep nibbles from crossing bytes), then transposed
    into TinyGemm's column-major blocks.
    """
    rows, k = p.shape
    c = p.view(rows // block, block, k)
    x, y = (c[:, : block // 2], c[:, block // 2 :]) if mode == "halves" else (c[:, 0::2], c[:, 1::2])
    x, y = x.view(torch.int64), y.view(torch.int64)  # rows stay contiguous: (nb, block/2, k/8)
    lo = ((x & _LOW_NIBBLES) | ((y & _LOW_NIBBLES) << 4)).view(torch.uint8)
    hi = (((x >> 4) & _LOW_NIBBLES) | (y & _HIGH_NIBBLES)).view(torch.uint8)
    out_lo.view(rows // block, k, block // 2).copy_(lo.transpose(1, 2))
    out_hi.view(rows // block, k, block // 2).copy_(hi.transpose(1, 2))


def tinygemm_cpu_layout() -> tuple[int, str] | None:
    """(block, mode) of this torch build's CPU int4 packing, found by packing a random probe with torch.

    The layout depends on the CPU's vector ISA (torch's int4mm kernel). If neither our decoder nor our
    encoder reproduces torch's packer exactly, the direct paths are disabled (quanto's slower,
    layout-agnostic code is used and dynamic dequantization is off) rather than risking wrong weights.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in _cpu_layout_cache:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 16, (208, 64), generator=gen, dtype=torch.int32)  # 3 blocks of 64 + 16 rows
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, innerKTiles=2)
        codes = probe.to(torch.uint8)
        found = None
        for block, mode in _CPU_LAYOUTS:
            if torch.equal(_decode_tinygemm_cpu(packed, 208, 64, block, mode), codes) and torch.equal(
                _encode_tinygemm_cpu(codes, block, mode), packed
            ):
                found = (block, mode)
                break
        if found is None:
            log.warning("unknown TinyGemm CPU packing (%s): direct repack and dynamic dequant disabled", cap)
        _cpu_layout_cache[cap] = found
    return _cpu_layout_cache[cap]


def _tinygemm_tensor(data: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, shape: tuple[int, int], group: int):
    """A TinyGemm weight from packed data and quanto's (scale, shift), formatted exactly as its constructor does."""
    n, k = shape
    scale_shift = torch.empty((k // group, n, 2), dtype=scale.dtype, device=scale.device)
    scale_shift[:, :, 0] = scale.view(n, k // group).t()
    # The kernel wants the mid-point of the range: -shift + 8 * scale, one rounding as in quanto's two ops.
    scale_shift[:, :, 1] = torch.add(-shift, scale, alpha=2 ** (qint4.bits - 1)).view(n, k // group).t()
    packed = TinyGemmPackedTensor(data, (n, k), (k, 1))
    return TinyGemmWeightQBitsTensor(qint4, 0, group, (n, k), (k, 1), packed, scale_shift)


# --------------------------------------------------------------------------------------------
# quantizing a weight a block of rows at a time


def _chunk_rows(n_rows: int, row_len: int, align: int = 64, elements: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) row blocks of about `elements` (CHUNK_ELEMENTS), `align`-aligned, never a last block of one row.

    A single-row block would make quanto treat it per-tensor (axis=None): different shapes.
    """
    step = max(align, ((elements or CHUNK_ELEMENTS) // max(row_len, 1)) // align * align)
    start = 0
    while start < n_rows:
        stop = min(n_rows, start + step)
        if 0 < n_rows - stop < 2:
            stop = n_rows
        yield start, stop
        start = stop


def _quantize_block_int4(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, shift) of a block of rows, exactly as QModuleMixin.qweight + quantize_weight compute them."""
    s, z = MaxOptimizer()(w, qtype=qint4, axis=0, group_size=group_size)
    codes = torch.ops.quanto.quantize_affine(w, bits=4, axis=0, group_size=group_size, scale=s, shift=z)
    return codes, s.view(-1, 1), z.view(-1, 1)


def quantize_int4_rows(
    read_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    group_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> WeightQBitsTensor:
    """A portable (kernel-agnostic) int4 weight, quantized block by block.

    `read_rows(a, b)` returns rows [a, b) in the compute dtype on `device`. Groups run along the
    input dimension, so a block's codes, scales and shifts are those of the whole-tensor
    quantization. quanto packs grouped row r with row r + ceil(R/2) into one byte; the packed buffer
    is filled in place.
    """
    n, k = shape
    gs = group_size or k
    per_row = k // gs
    total = n * per_row
    half = (total + 1) // 2
    packed = torch.zeros((half, gs), dtype=torch.uint8, device=device)
    scale = torch.empty((total, 1), dtype=dtype, device=device)
    shift = torch.empty((total, 1), dtype=dtype, device=device)
    for n0, n1 in _chunk_rows(n, k):
        r0, r1 = n0 * per_row, n1 * per_row
        codes, scale[r0:r1], shift[r0:r1] = _quantize_block_int4(read_rows(n0, n1), group_size)
        low_end = min(r1, half)
        if r0 < low_end:
            packed[r0:low_end] |= codes[: low_end - r0]
        if r1 > half:
            start = max(r0, half)
            packed[start - half : r1 - half] |= codes[start - r0 :] << 4
    data = PackedTensor(packed, 4, (total, gs), (gs, 1))
    return WeightQBitsTensor(qint4, 0, group_size, (n, k), (k, 1), data, scale, shift)


def direct_tinygemm_layout(
    shape: tuple[int, ...], group_size: int | None, dtype: torch.dtype, device: torch.device
) -> tuple[int, str] | None:
    """The CPU layout when a weight can go straight to TinyGemm block by block (bf16, group 128, rows % 128 == 0).

    Rows % 128 keeps both halves that quanto's portable packing pairs aligned to TinyGemm's row blocks.
    """
    if device.type != "cpu" or dtype != torch.bfloat16 or group_size != 128 or len(shape) != 2 or shape[0] % 128:
        return None
    return tinygemm_cpu_layout()


def quantize_int4_tinygemm_cpu(
    read_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    dtype: torch.dtype,
    layout: tuple[int, str],
    on_packed: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[TinyGemmWeightQBitsTensor, torch.Tensor, torch.Tensor]:
    """Quantize straight into TinyGemm's CPU layout: (weight, scale, shift), never a second copy of the layer.

    Row blocks [a, b) and [a + n/2, b + n/2) are quantized together: their codes are the low and high
    nibbles of rows [a, b) of quanto's portable packing, which `on_packed(first_grouped_row, bytes)`
    receives for the cache, and each is encoded into its rows of the TinyGemm buffer.
    """
    n, k = shape
    per_row, h = k // 128, n // 2
    data = torch.empty((n, k // 2), dtype=torch.uint8)
    scale = torch.empty((n * per_row, 1), dtype=dtype)
    shift = torch.empty((n * per_row, 1), dtype=dtype)
    for a, b in _chunk_rows(h, 2 * k):
        codes = []
        for lo in (a, a + h):
            r0, r1 = lo * per_row, (lo + b - a) * per_row
            c, scale[r0:r1], shift[r0:r1] = _quantize_block_int4(read_rows(lo, lo + b - a), 128)
            codes.append(c)
        portable = codes[0] | (codes[1] << 4)  # (rows * per_row, 128): quanto's packing of these rows
        del codes
        if on_packed is not None:
            on_packed(a * per_row, portable)
        _portable_to_tinygemm_cpu(portable.view(b - a, k), data[a:b], data[a + h : b + h], *layout)
    return _tinygemm_tensor(data, scale, shift, (n, k), 128), scale, shift


def tinygemm_from_portable_cpu(
    read_packed: Callable[[int, int], torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor,
    shape: tuple[int, int],
    layout: tuple[int, str],
) -> TinyGemmWeightQBitsTensor:
    """TinyGemm from quanto's portable packing, read a block of packed rows at a time (`read_packed(r0, r1)`)."""
    n, k = shape
    per_row, h = k // 128, n // 2
    data = torch.empty((n, k // 2), dtype=torch.uint8)
    for a, b in _chunk_rows(h, 2 * k, elements=REPACK_CHUNK_ELEMENTS):
        p = read_packed(a * per_row, b * per_row)  # (rows * per_row, 128): low nibble row a.., high row a + h..
        _portable_to_tinygemm_cpu(p.reshape(b - a, k), data[a:b], data[a + h : b + h], *layout)
    return _tinygemm_tensor(data, scale, shift, (n, k), 128)


def quantize_int8_rows(
    read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> WeightQBytesTensor:
    """A per-row symmetric int8 weight (quanto's AbsmaxOptimizer), quantized block by block."""
    n, k = shape
    data = torch.empty((n, k), dtype=torch.int8, device=device)
    scale = torch.empty((n, 1), dtype=dtype, device=device)
    optimizer = AbsmaxOptimizer()
    for n0, n1 in _chunk_rows(n, k):
        w = read_rows(n0, n1)
        s = optimizer(w, qtype=qint8, axis=0)
        data[n0:n1] = torch.ops.quanto.quantize_symmetric(w, dtype=torch.int8, axis=0, scale=s)
        scale[n0:n1] = s
    return WeightQBytesTensor(qint8, 0, (n, k), (k, 1), data, scale, None)


def _tinygemm_target(w: WeightQBitsTensor) -> bool:
    """Whether quanto's `WeightQBitsTensor.create` would choose TinyGemm (its test, plus the CPU packer's N % 16).

    Without the N % 16 check quanto crashes in `_convert_weight_to_int4pack_for_cpu`; we keep the
    fallback layout instead.
    """
    if not (w.qtype == qint4 and w.axis == 0 and w._group_size == 128 and w.ndim == 2):
        return False
    if w._scale.dtype != torch.bfloat16:
        return False
    dev = w._data.device
    if dev.type == "cpu":
        return w.shape[0] % 16 == 0
    if dev.type == "cuda" and torch.version.cuda:
        major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
        return (major, minor) >= (12, 1) and torch.cuda.get_device_capability(dev)[0] >= 8
    return False


def _nibbles(packed: torch.Tensor, r0: int, r1: int, half: int) -> torch.Tensor:
    """Unpacked 4-bit codes of grouped rows [r0, r1) of a portable PackedTensor's buffer."""
    parts = []
    low_end = min(r1, half)
    if r0 < low_end:
        parts.append(packed[r0:low_end] & 0x0F)
    if r1 > half:
        start = max(r0, half)
        parts.append(packed[start - half : r1 - half] >> 4)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _to_tinygemm(w: WeightQBitsTensor) -> TinyGemmWeightQBitsTensor:
    """Repack a portable int4 weight for TinyGemm block by block.

    quanto's own repack (`optimize()`) converts all codes to int32 first: 4 B/param of the layer at
    once, 2.6 GB for CogVLM2's lm_head. TinyGemm's packing is local to blocks of output rows on CPU
    and CUDA, so blocks are packed separately: on CPU with our encoder, elsewhere with quanto's
    constructor (whose CUDA layout we do not reimplement).
    """
    n, k = w.shape
    g = w._group_size
    packed = w._data._data
    layout = direct_tinygemm_layout(w.shape, g, w._scale.dtype, packed.device)
    if layout is not None:
        return tinygemm_from_portable_cpu(lambda r0, r1: packed[r0:r1], w._scale, w._shift, (n, k), layout)
    per_row, half = k // g, packed.shape[0]
    layout = tinygemm_cpu_layout() if packed.device.type == "cpu" else None
    data = None
    for n0, n1 in _chunk_rows(n, k):
        r0, r1 = n0 * per_row, n1 * per_row
        codes = _nibbles(packed, r0, r1, half).view(n1 - n0, k)
        if layout is not None:
            bdata = _encode_tinygemm_cpu(codes, *layout)
        else:
            scale_shift = (w._scale[r0:r1], w._shift[r0:r1])
            bdata = TinyGemmWeightQBitsTensor(qint4, 0, g, (n1 - n0, k), (k, 1), codes, scale_shift)._data._data
        if data is None:  # CPU: (rows, k/2) uint8; CUDA: (rows/8, k/32, 32, 1) int32
            rows_per_item = (n1 - n0) // bdata.shape[0]
            data = bdata.new_empty((n // rows_per_item, *bdata.shape[1:]))
        data[n0 // rows_per_item : n1 // rows_per_item] = bdata
    return _tinygemm_tensor(data, w._scale, w._shift, (n, k), g)


def optimize_weight(w: QTensor) -> QTensor:
    """Portable weight -> the layout of the fastest kernel quanto has for it on its device."""
    if type(w) is WeightQBitsTensor:
        if _tinygemm_target(w):
            return _to_tinygemm(w)
        if w._data.device.type == "cuda":
            return w.optimize()  # AWQ for fp16 on sm80+ (whole-tensor repack), else unchanged
        return w
    if type(w) is WeightQBytesTensor:
        return w.optimize()
    return w


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
# kernels

FALLBACK_CLASS = "WeightQBitsTensor"


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """Quantized Linears per weight class: the class decides which kernel runs (QUANTO_NOTES section 1.1)."""
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, QModuleMixin) and isinstance(m.weight, QTensor):
            counts[type(m.weight).__name__] += 1
    return dict(sorted(counts.items()))


def describe_int4_kernel(device: torch.device, dtype: torch.dtype, group_size: int | None) -> tuple[str, bool]:
    """(log line, is_fallback) for the int4 kernel quanto will pick for this device, dtype and group size."""
    if group_size != 128:
        return f"int4 group {group_size}: no fused kernel (only group 128 has one); dequantize fallback", True
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        sm = f"sm{cc[0]}{cc[1]}"
        if cc[0] < 8:
            return (
                f"{sm} (pre-Ampere): quanto has no fused int4 kernel; every int4 layer dequantizes its whole "
                "weight per call (memory saved, slower than 16-bit)",
                True,
            )
        if dtype == torch.bfloat16:
            return f"{sm}: int4 TinyGemm kernel (torch._weight_int4pack_mm, bf16)", False
        if dtype == torch.float16:
            return f"{sm}: int4 AWQ kernel (fp16; needs quanto's JIT CUDA build)", False
        return f"{sm}: {dtype} has no fused int4 kernel; dequantize fallback", True
    if device.type == "cpu":
        if dtype == torch.bfloat16:
            return "cpu: int4 TinyGemm kernel (torch._weight_int4pack_mm_for_cpu, bf16)", False
        name = str(dtype).removeprefix("torch.")
        return f"cpu: {name} has no fused int4 kernel (bf16 has); dequantize fallback", True
    return f"{device.type}: dequantize fallback", True


# --------------------------------------------------------------------------------------------
# cache


class CacheError(Exception):
    """A cache entry that must not be used (stale, incomplete, edited or unreadable)."""


def default_cache_dir() -> Path:
    """$COGBATCH_CACHE_DIR, else ~/.cache/cogbatch (pipeline.yaml's `cache_dir` is passed explicitly)."""
    return Path(os.environ.get("COGBATCH_CACHE_DIR") or "~/.cache/cogbatch").expanduser()


def checkpoint_identity(ckpt: Path, files: list[Path]) -> dict[str, Any]:
    """Resolved path plus name, size and mtime of config.json, the index and every weight file."""
    paths = [ckpt / "config.json"]
    if (ckpt / "model.safetensors.index.json").is_file():
        paths.append(ckpt / "model.safetensors.index.json")
    paths += list(files)
    entries = []
    for p in paths:
        st = p.stat()  # follows the hub cache's symlinks to the blobs
        entries.append({"name": p.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"path": str(ckpt.resolve()), "files": entries}


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import cogbatch

    try:
        quanto = version("optimum-quanto")
    except PackageNotFoundError:
        quanto = "unknown"
    return {"torch": torch.__version__, "optimum-quanto": quanto, "cogbatch": cogbatch.__version__}


def cache_key(ckpt: Path, files: list[Path], quant: QuantConfig, dtype: torch.dtype) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, the fields it hashes): checkpoint identity, rules, dtype, library versions, format."""
    fields = {
        "format": CACHE_FORMAT,
        "checkpoint": checkpoint_identity(ckpt, files),
        "quantization": quant.key_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": library_versions(),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest, fields


def cache_entry(cache_root: Path, ckpt: Path, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ckpt.resolve().name)[:60] or "model"
    return cache_root / "quantized" / f"{slug}-{key[:16]}"


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
}


class CacheWriter:
    """Writes one safetensors file tensor by tensor as the loader produces them, then publishes atomically.

    Every name, shape and dtype is known before the first weight is read, so the header (with all
    offsets) is written first and each tensor goes to its offset with `pwrite`: nothing is buffered,
    on a GPU only one layer at a time is copied to the host. The entry appears under its final name
    (a rename of the temp dir) only once every tensor and the sidecar are written and fsynced. A
    failure is logged once and only disables the cache for this load.
    """

    def __init__(self, entry: Path, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], key: str) -> None:
        self.entry = entry
        self.layout = layout
        self.key = key
        self.failed: str | None = None
        self.seconds = 0.0
        self._fd: int | None = None
        self._missing = {name: math.prod(shape) * dt.itemsize for name, (shape, dt) in layout.items()}
        self._tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            self._tmp.mkdir(parents=True)
            header: dict[str, Any] = {"__metadata__": {"format": "pt", "cogbatch_key": key}}
            offset = 0
            self._offsets = {}
            for name, (shape, dt) in layout.items():
                nbytes = math.prod(shape) * dt.itemsize
                span = [offset, offset + nbytes]
                header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": span}
                self._offsets[name] = (offset, nbytes)
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            self._data_start = 8 + len(blob)
            self._fd = os.open(self._tmp / CACHE_WEIGHTS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(self._fd, len(blob).to_bytes(8, "little") + blob, 0)
            os.ftruncate(self._fd, self._data_start + offset)
        except (OSError, KeyError) as e:
            self._fail(e)
        self.seconds += time.perf_counter() - t0

    @property
    def active(self) -> bool:
        return self.failed is None

    def write(self, name: str, tensor: torch.Tensor, first_row: int | None = None) -> None:
        """Write a whole tensor, or with `first_row` a block of its rows (the rest come in other calls)."""
        if not self.active:
            return
        t0 = time.perf_counter()
        try:
            shape, dt = self.layout[name]
            whole = first_row is None
            if tensor.dtype != dt or (tuple(tensor.shape) != shape if whole else tuple(tensor.shape[1:]) != shape[1:]):
                raise CacheError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} does not fit the planned {shape} {dt}")
            offset, nbytes = self._offsets[name]
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            start = 0 if whole else first_row * (nbytes // shape[0])
            if start + raw.nbytes > nbytes:
                raise CacheError(f"{name}: write past the end of the tensor")
            view = memoryview(raw)
            done = 0
            while done < raw.nbytes:
                done += os.pwrite(self._fd, view[done:], self._data_start + offset + start + done)
            self._missing[name] -= raw.nbytes
        except (OSError, CacheError, KeyError) as e:
            self._fail(e)
        self.seconds += time.perf_counter() - t0

    def write_module(self, prefix: str, state: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.write(f"{prefix}.{name}", tensor)

    def commit(self, sidecar: dict[str, Any]) -> bool:
        """Publish the entry; returns False (entry discarded) if anything failed or is missing."""
        if not self.active:
            return False
        t0 = time.perf_counter()
        try:
            missing = sorted(n for n, left in self._missing.items() if left)
            if missing:
                raise CacheError(f"{len(missing)} tensors were not (completely) written, e.g. {missing[0]}")
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            sidecar = {
                **sidecar,
                "files": {CACHE_WEIGHTS: (self._tmp / CACHE_WEIGHTS).stat().st_size},
                "tensors": {n: [list(s), str(d).removeprefix("torch.")] for n, (s, d) in self.layout.items()},
            }
            side = self._tmp / CACHE_SIDECAR
            with open(side, "w") as f:
                json.dump(sidecar, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self._tmp)
            if self.entry.exists():  # a stale or corrupt entry under the same name: move it out of the way
                trash = self.entry.parent / f".{self.entry.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(self._tmp, self.entry)
            _fsync_dir(self.entry.parent)
        except (OSError, CacheError) as e:
            self._fail(e)
            return False
        finally:
            self.seconds += time.perf_counter() - t0
        return True

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _fail(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {error}"
            log.warning("could not write the quantized-weights cache %s (%s); going on without it", self.entry, error)
        self.abort()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _plan_json(plan: Mapping[str, LayerPlan]) -> dict[str, Any]:
    return {name: {"weights": lp.qtype, "group_size": lp.group_size} for name, lp in plan.items()}


def read_cache_entry(
    entry: Path, key: str, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], plan: Mapping[str, LayerPlan]
) -> dict[str, Any]:
    """The sidecar of a usable entry; raises CacheError naming what is wrong otherwise.

    Checks the key, the file size, and every tensor's name, shape and dtype in the safetensors header
    against what this config must produce, so an edited, truncated or foreign entry is never loaded.
    """
    from safetensors import safe_open

    side = entry / CACHE_SIDECAR
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"unreadable sidecar {side}: {e}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != CACHE_FORMAT:
        raise CacheError(f"{side}: unknown format {sidecar.get('format') if isinstance(sidecar, dict) else None!r}")
    if sidecar.get("key") != key:
        raise CacheError(f"{side}: key does not match this checkpoint, configuration and library versions")
    if sidecar.get("layers") != _plan_json(plan):
        raise CacheError(f"{side}: per-layer quantization differs from the rules")
    weights = entry / CACHE_WEIGHTS
    try:
        size = weights.stat().st_size
    except OSError as e:
        raise CacheError(f"{weights}: {e}") from None
    if size != sidecar.get("files", {}).get(CACHE_WEIGHTS):
        raise CacheError(f"{weights}: {size} bytes, the sidecar says {sidecar.get('files', {}).get(CACHE_WEIGHTS)}")
    try:
        with safe_open(weights, framework="pt", device="cpu") as h:
            found = {}
            for name in h.keys():  # noqa: SIM118
                sl = h.get_slice(name)
                found[name] = (tuple(sl.get_shape()), sl.get_dtype())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CacheError(f"{weights}: unreadable ({type(e).__name__}: {e})") from None
    expected = {n: (s, _ST_DTYPES[d]) for n, (s, d) in layout.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        wrong = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])[:3]
        raise CacheError(f"{weights}: tensors differ from the expected layout (missing {missing}, extra {extra}, "
                         f"wrong shape/dtype {wrong})")  # fmt: skip
    return sidecar


# --------------------------------------------------------------------------------------------
# memory and time accounting


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs) so the peak covers this load only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class LoadTracker:
    """Times the phases of a load and records peak host memory (VmHWM, sampled RssAnon) and device memory."""

    def __init__(self, device: torch.device, sample_interval: float = 0.002) -> None:
        self.device = device
        self.times: defaultdict[str, float] = defaultdict(float)
        self.interval = sample_interval
        self.total_s = 0.0
        self.cpu_s = 0.0
        self.peak_rss: int | None = None
        self.peak_anon: int | None = None
        self.baseline_anon: int | None = None
        self.peak_device: int | None = None

    def __enter__(self) -> LoadTracker:
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        anon = _proc_status_kib("RssAnon")
        self.baseline_anon = None if anon is None else anon * 1024
        self._peak_anon_kib = anon or 0
        self._hwm_reset = _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop = threading.Event()
        self._thread = None
        if anon is not None:
            self._thread = threading.Thread(target=self._sample, name="cogbatch-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            anon = _proc_status_kib("RssAnon")
            if anon is not None and anon > self._peak_anon_kib:
                self._peak_anon_kib = anon

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            anon = _proc_status_kib("RssAnon") or 0
            self.peak_anon = max(self._peak_anon_kib, anon) * 1024
        self.total_s = time.perf_counter() - self._t0
        self.cpu_s = time.process_time() - self._cpu0
        hwm = _proc_status_kib("VmHWM")
        self.peak_rss = hwm * 1024 if (hwm is not None and self._hwm_reset) else None
        if self.device.type == "cuda":
            self.peak_device = torch.cuda.max_memory_allocated(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] += time.perf_counter() - t0


@dataclass
class LoadReport:
    """What a load did: weight bytes by dtype and component, time per phase, peak memory, kernels, cache."""

    checkpoint: str
    device: str
    dtype: str
    quantization: str
    quant_config: dict[str, Any] | None
    weight_bytes: dict[str, int]
    component_bytes: dict[str, int]
    host_bytes: int
    read_s: float
    quantize_s: float
    repack_s: float
    cache_read_s: float
    cache_write_s: float
    total_s: float
    cpu_s: float
    peak_host_rss_bytes: int | None
    peak_host_anon_bytes: int | None
    baseline_host_anon_bytes: int | None
    peak_device_bytes: int | None
    kernels: dict[str, int] = field(default_factory=dict)
    unquantized_linears: int = 0
    fallback_layers: int = 0
    cache_hit: bool = False
    cache_path: str | None = None
    cache_status: str = "disabled"
    dequant_threshold: float | None = None

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_weight_bytes": self.total_weight_bytes}

    def summary(self) -> str:
        """A few human-readable lines for logs and the run summary."""

        def mib(n: int | None) -> str:
            return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"

        phases = [("read", self.read_s), ("quantize", self.quantize_s), ("repack", self.repack_s),
                  ("cache read", self.cache_read_s), ("cache write", self.cache_write_s)]  # fmt: skip
        lines = [
            f"loaded {self.checkpoint} on {self.device} ({self.dtype}, {self.quantization}) in {self.total_s:.2f} s "
            f"(CPU {self.cpu_s:.2f} s): " + ", ".join(f"{k} {v:.2f} s" for k, v in phases if v > 0),
            f"weights {mib(self.total_weight_bytes)}: "
            + ", ".join(f"{k} {mib(v)}" for k, v in self.weight_bytes.items() if v)
            + (f"; kept on the host: {mib(self.host_bytes)}" if self.host_bytes else ""),
            f"peak host RSS {mib(self.peak_host_rss_bytes)}, anonymous {mib(self.peak_host_anon_bytes)} "
            f"(from {mib(self.baseline_host_anon_bytes)}); peak device {mib(self.peak_device_bytes)}",
        ]
        if self.kernels or self.unquantized_linears:
            kernels = ", ".join(
                f"{k} x{v}" + (" (dequantize fallback)" if k == FALLBACK_CLASS else "")
                for k, v in self.kernels.items()
            )
            line = f"kernels: {kernels or '-'}; unquantized Linears: {self.unquantized_linears}"
            if self.dequant_threshold is not None:
                line += f"; dense matmul above {self.dequant_threshold:g} rows"
            lines.append(line)
        if self.quant_config is not None:
            lines.append(f"cache: {self.cache_status}" + (f" ({self.cache_path})" if self.cache_path else ""))
        return "\n".join(lines)


def weight_bytes(model: nn.Module) -> tuple[dict[str, int], dict[str, int], int]:
    """(bytes by int4/int8/8-/16-/32-bit, bytes by component, bytes on the CPU) from the actual inner tensors."""
    by_dtype: Counter[str] = Counter()
    by_component: Counter[str] = Counter({"vision": 0, "language": 0, "embeddings": 0, "lm_head": 0})
    on_cpu = 0
    model_device = getattr(model, "device", None)
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False))
        skip = module._non_persistent_buffers_set
        tensors += [(n, b) for n, b in module.named_buffers(recurse=False) if n not in skip]
        for name, t in tensors:
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(t, QTensor):
                nbytes = sum(x.numel() * x.element_size() for x in _inner_tensors(t))
                category = "int4" if t.qtype == qint4 else "int8" if t.qtype == qint8 else t.qtype.name
            else:
                nbytes = t.numel() * t.element_size()
                category = f"{t.element_size() * 8}-bit"
            by_dtype[category] += nbytes
            by_component[component_of(full)] += nbytes
            if model_device is not None and model_device.type != "cpu" and t.device.type == "cpu":
                on_cpu += nbytes
    order = ["int4", "int8", "8-bit", "16-bit", "32-bit"]
    return (
        dict(sorted(by_dtype.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)),
        dict(by_component),
        on_cpu,
    )


def _inner_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _inner_tensors(getattr(t, n))
    elif isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
        yield from _inner_tensors(t.data)
    else:
        yield t


def build_report(
    model: nn.Module,
    tracker: LoadTracker,
    *,
    checkpoint: Path,
    dtype: torch.dtype,
    quant: QuantConfig | None,
    cache_hit: bool = False,
    cache_path: Path | None = None,
    cache_status: str = "disabled",
    dequant_threshold: float | None = None,
) -> LoadReport:
    by_dtype, by_component, on_cpu = weight_bytes(model)
    kernels = kernel_counts(model)
    unquantized = sum(1 for m in model.modules() if type(m) is nn.Linear)
    t = tracker.times
    return LoadReport(
        checkpoint=str(checkpoint),
        device=str(tracker.device),
        dtype=str(dtype).removeprefix("torch."),
        quantization=quant.label() if quant is not None else "none",
        quant_config=quant.to_dict() if quant is not None else None,
        weight_bytes=by_dtype,
        component_bytes=by_component,
        host_bytes=on_cpu,
        read_s=t["read"],
        quantize_s=t["quantize"],
        repack_s=t["repack"],
        cache_read_s=t["cache_read"],
        cache_write_s=t["cache_write"],
        total_s=tracker.total_s,
        cpu_s=tracker.cpu_s,
        peak_host_rss_bytes=tracker.peak_rss,
        peak_host_anon_bytes=tracker.peak_anon,
        baseline_host_anon_bytes=tracker.baseline_anon,
        peak_device_bytes=tracker.peak_device,
        kernels=kernels,
        unquantized_linears=unquantized,
        fallback_layers=kernels.get(FALLBACK_CLASS, 0),
        cache_hit=cache_hit,
        cache_path=None if cache_path is None else str(cache_path),
        cache_status=cache_status,
        dequant_threshold=dequant_threshold,
    )


# --------------------------------------------------------------------------------------------
# the loader


def build_skeleton(model_cls: Callable[[CogVLMConfig], nn.Module], cfg: CogVLMConfig, plan: Mapping[str, LayerPlan]):
    """The model on meta with every planned Linear already swapped for a (meta) DequantQLinear.

    quanto's `quantize()` walks every module per call; the swap is done here by name. The QLinear
    is built as quanto's `QLinear.qcreate` builds it, directly on meta (its `from_module` would then
    only re-attach the meta weight), and gets the group size quanto takes no argument for.
    """
    with torch.device("meta"):  # everything on meta; `_materialize_buffers` recomputes the rotary buffers
        model = model_cls(cfg)
    for name, lp in plan.items():
        linear = model.get_submodule(name)
        qmodule = DequantQLinear(
            linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype,
            device="meta", weights=_QTYPES[lp.qtype], quantize_input=True,
        )  # fmt: skip
        qmodule.weight_group_size = lp.group_size if lp.qtype == "int4" else None
        qmodule.name = name
        set_module_by_name(model, name, qmodule)
    return model


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Compute the derived buffers (rotary frequencies) on `device`.

    Not `model.to(device)`: that would also move CPU-resident embeddings and walk every quantized
    weight through quanto's device-move path.
    """
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)) and hasattr(
            module, "reset_buffers"
        ):
            module.reset_buffers(device)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and not buf.is_meta and buf.device != device:
                module._buffers[name] = buf.to(device)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()
_TRIM_EVERY = 16 << 20
_since_trim = 0


def release_host_memory(processed_bytes: int) -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`) every ~64 MB of tensors processed.

    The loader frees a few MB-sized blocks per layer; glibc keeps them in its heap, where they pile
    up as fragmentation (measured: +250 MB RSS on a 0.5B-param load). A no-op without glibc.
    """
    global _since_trim
    _since_trim += processed_bytes
    if _MALLOC_TRIM is not None and _since_trim >= _TRIM_EVERY:
        _since_trim = 0
        _MALLOC_TRIM(0)


def _check_no_meta(model: nn.Module) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on meta after loading: {', '.join(left[:5])}")


def _assign_quantized(module: QModuleMixin, weight: QTensor, dtype: torch.dtype, device: torch.device) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.input_scale = torch.ones((), dtype=dtype, device=device)
    module.output_scale = torch.ones((), dtype=dtype, device=device)


def _place(name: str, quant: QuantConfig, device: torch.device) -> torch.device:
    if quant.embeddings_on_cpu and name == "model.embed_tokens.weight":
        return torch.device("cpu")
    return device


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
    it on the other side (an O(K^2 N) identity matmul: 51 s for one 4096x11008 layer on CPU,
    QUANTO_NOTES 1.4). For parking weights in host memory between phases and bringing them back,
    the packed bytes can simply be copied; a weight parked this way is only meant to return to a
    device of its original type (its packing is that device's).
    """
    device = torch.device(device)
    with torch.no_grad():
        for m in module.modules():
            for name, param in m._parameters.items():
                if param is not None and param.device != device:
                    m._parameters[name] = nn.Parameter(_move_raw(param, device), requires_grad=param.requires_grad)
            for name, buf in m._buffers.items():
                if buf is not None and buf.device != device:
                    m._buffers[name] = buf.to(device)
    return module


def offload_embeddings(model: nn.Module, device: torch.device) -> None:
    """Keep `model.embed_tokens` on the CPU: token ids go there for the lookup, rows come back to `device`.

    Done with forward hooks, so the embedding module and the code calling it stay unchanged.
    """
    emb = model.model.embed_tokens
    table_device = emb.weight.device

    def ids_to_table(module: nn.Module, args: tuple) -> tuple:
        return (args[0].to(table_device), *args[1:])

    def rows_to_device(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(device)

    emb.register_forward_pre_hook(ids_to_table)
    emb.register_forward_hook(rows_to_device)


def _quantize_from_checkpoint(
    model_cls, cfg, files, plan, *, dtype, device, quant, tracker, writer: CacheWriter | None
) -> nn.Module:
    """Stream the checkpoint into a quantized skeleton; write the cache as tensors are produced.

    A planned Linear's weight is read a block of rows at a time and quantized; bf16 group-128
    weights on CPU go straight into TinyGemm's layout, the others through quanto's portable layout
    and a block-wise repack. Every other tensor is cast to the compute dtype, big ones by blocks too.
    """
    from accelerate.utils import set_module_tensor_to_device

    model = build_skeleton(model_cls, cfg, plan)
    for src in stream_lazy_tensors(files):
        name = src.name
        if name.endswith(DERIVED_SUFFIXES):
            continue
        module_name, _, leaf = name.rpartition(".")
        lp = plan.get(module_name)
        if lp is not None and leaf == "weight":
            _stream_quantized_weight(model.get_submodule(module_name), module_name, src, lp,
                                     dtype=dtype, device=device, tracker=tracker, writer=writer)  # fmt: skip
        else:
            target = _place(name, quant, device)
            with tracker.phase("read"):
                tensor = _read_cast(src, dtype, target)
                set_module_tensor_to_device(model, name, target, value=tensor, dtype=dtype)
            if writer is not None:
                writer.write(name, tensor)
            del tensor
        release_host_memory(math.prod(src.shape) * 2)
    if writer is not None:
        tracker.times["cache_write"] += writer.seconds
    _materialize_buffers(model, device)
    _check_no_meta(model)
    return model


def _owned(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` in `dtype`, in memory of its own.

    safetensors may hand out tensors that view the memory-mapped file at any byte offset; some CPU
    kernels crash on such unaligned data (`torch._weight_int8pack_mm` segfaults on an int8 weight at
    an odd address, torch 2.13) and the model must not depend on the file staying in place.
    """
    out = t.to(device=device, dtype=dtype or t.dtype)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def _read_cast(src: LazyTensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A checkpoint tensor on `device` in `dtype`; large ones a block of rows at a time (no second full copy)."""
    if math.prod(src.shape) < CHUNK_ELEMENTS or len(src.shape) < 2:
        return _owned(src.read(), device, dtype)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    for a, b in _chunk_rows(src.shape[0], math.prod(src.shape[1:]), align=1):
        out[a:b] = src.read_rows(a, b).to(device)
    return out


def _stream_quantized_weight(module, module_name, src, lp, *, dtype, device, tracker, writer) -> None:
    """Quantize one Linear weight from the checkpoint into `module` (a meta DequantQLinear)."""
    prefix = f"{module_name}.weight."

    def read_rows(a: int, b: int) -> torch.Tensor:
        with tracker.phase("read"):
            t = src.read_rows(a, b).to(device)
        return t.to(dtype)

    read_before, t0 = tracker.times["read"], time.perf_counter()
    layout = direct_tinygemm_layout(src.shape, lp.group_size, dtype, device) if lp.qtype == "int4" else None
    if layout is not None:
        on_packed = None if writer is None else (lambda r0, rows: writer.write(prefix + "_data._data", rows, r0))
        weight, scale, shift = quantize_int4_tinygemm_cpu(read_rows, src.shape, dtype, layout, on_packed)
        _assign_quantized(module, weight, dtype, device)
        if writer is not None:
            state = {"weight._scale": scale, "weight._shift": shift}
            writer.write_module(
                module_name, {**state, "input_scale": module.input_scale, "output_scale": module.output_scale}
            )
        tracker.times["quantize"] += time.perf_counter() - t0 - (tracker.times["read"] - read_before)
        return
    if lp.qtype == "int4":
        portable = quantize_int4_rows(read_rows, src.shape, lp.group_size, dtype, device)
    else:
        portable = quantize_int8_rows(read_rows, src.shape, dtype, device)
    tracker.times["quantize"] += time.perf_counter() - t0 - (tracker.times["read"] - read_before)
    _assign_quantized(module, portable, dtype, device)
    if writer is not None:
        writer.write_module(module_name, {k: v for k, v in module.state_dict().items() if k != "bias"})
    with tracker.phase("repack"):
        module.weight = nn.Parameter(optimize_weight(portable), requires_grad=False)


class _CacheReader:
    """Reads tensors (or blocks of rows) of a validated cache file with `pread` into fresh tensors.

    One copy from the page cache into memory that torch allocated (aligned, owned), instead of
    safetensors' memory map plus a clone: measured ~4x faster for the 263 MB embedding table.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        header = json.loads(os.pread(self._fd, size, 8))
        header.pop("__metadata__", None)
        self._start = 8 + size
        dtypes = {v: k for k, v in _ST_DTYPES.items()}
        self._index = {n: (tuple(h["shape"]), dtypes[h["dtype"]], h["data_offsets"][0]) for n, h in header.items()}

    def close(self) -> None:
        os.close(self._fd)

    def read(self, name: str, rows: tuple[int, int] | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or rows [a, b) of it; into (the start of) `buffer` if given, to reuse its memory."""
        shape, dtype, offset = self._index[name]
        if rows is not None:
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            offset += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        if buffer is None or buffer.numel() * buffer.element_size() < math.prod(shape) * dtype.itemsize:
            out = torch.empty(shape, dtype=dtype)
        else:
            out = buffer.view(-1).view(torch.uint8)[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < view.nbytes:
            got = os.preadv(self._fd, [view[done:]], self._start + offset + done)
            if got <= 0:
                raise CacheError(f"{name}: the cache file ends early")
            done += got
        return out


def _load_from_cache(model_cls, cfg, entry, names, plan, *, dtype, device, quant, tracker) -> nn.Module:
    """Assign the cached tensors to a fresh quantized skeleton, repacking each weight for its kernel."""
    from accelerate.utils import set_module_tensor_to_device

    model = build_skeleton(model_cls, cfg, plan)
    shapes = checkpoint_tensor_shapes(cfg)
    reader = _CacheReader(entry / CACHE_WEIGHTS)
    try:
        chunk = torch.empty(REPACK_CHUNK_ELEMENTS // 2, dtype=torch.uint8)  # reused for the blocks of packed rows

        def get(name: str, target: torch.device = device, rows: tuple[int, int] | None = None) -> torch.Tensor:
            with tracker.phase("cache_read"):
                return reader.read(name, rows, chunk if rows is not None else None).to(target)

        for name in names:
            if name.endswith(DERIVED_SUFFIXES):
                continue
            module_name, _, leaf = name.rpartition(".")
            lp = plan.get(module_name)
            if lp is None or leaf != "weight":
                target = _place(name, quant, device)
                set_module_tensor_to_device(model, name, target, value=get(name, target), dtype=dtype)
                continue
            module = model.get_submodule(module_name)
            n, k = shapes[name]
            p = f"{module_name}.weight."
            layout = direct_tinygemm_layout((n, k), lp.group_size, dtype, device) if lp.qtype == "int4" else None
            if layout is not None:
                scale, shift = get(p + "_scale"), get(p + "_shift")
                t0, read_before = time.perf_counter(), tracker.times["cache_read"]
                weight = tinygemm_from_portable_cpu(
                    lambda r0, r1, name=p + "_data._data": get(name, rows=(r0, r1)), scale, shift, (n, k), layout
                )
                tracker.times["repack"] += time.perf_counter() - t0 - (tracker.times["cache_read"] - read_before)
            else:
                if lp.qtype == "int4":
                    gs = lp.group_size or k
                    data = PackedTensor(get(p + "_data._data"), 4, (n * (k // gs), gs), (gs, 1))
                    portable = WeightQBitsTensor(qint4, 0, lp.group_size, (n, k), (k, 1), data,
                                                 get(p + "_scale"), get(p + "_shift"))  # fmt: skip
                else:
                    portable = WeightQBytesTensor(qint8, 0, (n, k), (k, 1), get(p + "_data"), get(p + "_scale"), None)
                with tracker.phase("repack"):
                    weight = optimize_weight(portable)
                del portable
            _assign_quantized(module, weight, dtype, device)
            module.input_scale = get(f"{module_name}.input_scale")
            module.output_scale = get(f"{module_name}.output_scale")
            release_host_memory(n * k // 2)
    finally:
        reader.close()
    _materialize_buffers(model, device)
    _check_no_meta(model)
    return model


def load_quantized(
    model_cls: Callable[[CogVLMConfig], nn.Module],
    cfg: CogVLMConfig,
    ckpt: Path,
    files: list[Path],
    names: list[str],
    *,
    quant: QuantConfig,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: str | Path | bool | None,
    dequant_threshold: Any,
    tracker: LoadTracker,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a quantized model from the cache if a valid entry exists, else by streaming the checkpoint.

    `names` are the checkpoint's tensors in stream order (they fix the cache file's layout).
    Returns the model and the cache facts for the load report.
    """
    plan = plan_layers(cfg, quant)
    shapes = checkpoint_tensor_shapes(cfg)
    layout = quantized_state_layout({n: shapes[n] for n in names}, plan, dtype)
    groups = {lp.group_size for lp in plan.values() if lp.qtype == "int4"}
    for g in sorted(groups, key=lambda x: x or 0):
        line, fallback = describe_int4_kernel(device, dtype, g)
        (log.warning if fallback else log.info)("int4 kernel: %s", line)

    cache = {"cache_hit": False, "cache_path": None, "cache_status": "disabled"}
    entry = key = fields = None
    if cache_dir is not False:
        root = Path(cache_dir).expanduser() if cache_dir not in (None, True) else default_cache_dir()
        key, fields = cache_key(ckpt, files, quant, dtype)
        entry = cache_entry(root, ckpt, key)
        cache["cache_path"] = entry

    model = None
    if entry is not None and entry.exists():
        try:
            read_cache_entry(entry, key, layout, plan)
            model = _load_from_cache(model_cls, cfg, entry, names, plan, dtype=dtype, device=device, quant=quant,
                                     tracker=tracker)  # fmt: skip
            cache.update(cache_hit=True, cache_status="hit")
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:  # stale, edited, truncated or unreadable: quantize again, never crash
            reason = str(e) if isinstance(e, CacheError) else f"{type(e).__name__}: {e}"
            log.warning("ignoring the quantized-weights cache %s: %s; quantizing the checkpoint again", entry, reason)
            cache["cache_status"] = f"stale ({reason}); rebuilt"
            model = None
    if model is None:
        writer = CacheWriter(entry, layout, key) if entry is not None else None
        try:
            model = _quantize_from_checkpoint(model_cls, cfg, files, plan, dtype=dtype, device=device,
                                              quant=quant, tracker=tracker, writer=writer)  # fmt: skip
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            sidecar = {
                "format": CACHE_FORMAT,
                "key": key,
                "key_fields": fields,
                "quantization": quant.to_dict(),
                "layers": _plan_json(plan),
                "quantization_map": quantization_map(model),
                "dtype": str(dtype).removeprefix("torch."),
                "versions": fields["versions"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            t0 = time.perf_counter()
            ok = writer.commit(sidecar)
            tracker.times["cache_write"] += time.perf_counter() - t0
            if cache["cache_status"] == "disabled":
                cache["cache_status"] = "written" if ok else f"not written ({writer.failed})"
            elif not ok:
                cache["cache_status"] += f"; not written ({writer.failed})"

    if quant.embeddings_on_cpu and device.type != "cpu":
        offload_embeddings(model, device)
    threshold = resolve_dequant_threshold(dequant_threshold, device)
    set_dequant_threshold(model, threshold)
    if (
        threshold is not None
        and device.type == "cuda"
        and any(
            isinstance(m, DequantQLinear) and isinstance(m.weight, TinyGemmWeightQBitsTensor) for m in model.modules()
        )
    ):
        log.info("dynamic dequantization: no fast decoder for TinyGemm's CUDA packing; those layers stay fused")
    cache["dequant_threshold"] = threshold
    counts = kernel_counts(model)
    if counts.get(FALLBACK_CLASS):
        log.warning(
            "%d quantized Linear layers use quanto's dequantize fallback (%s): every call unpacks the whole "
            "weight; bf16 with int4 group 128 gets the TinyGemm kernel on CPU and sm80+ GPUs",
            counts[FALLBACK_CLASS],
            ", ".join(f"{k} x{v}" for k, v in counts.items()),
        )
    return model, cache

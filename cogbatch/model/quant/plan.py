"""What a quantized load will do, decided from names and shapes alone: per-layer plan, bytes, kernels.

`cogbatch plan` predicts device memory from `config.json` without reading weights, so this module
must not import optimum-quanto (a test checks it): it only knows quanto's behaviour as facts
(measured on quanto 0.2.7): which Linear gets which dtype and group size, how many bytes quanto's portable
layout holds for it, and which kernel class quanto's `WeightQBitsTensor.create` will choose.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.model.settings import torch_dtype
from cogbatch.model.weights import DERIVED_SUFFIXES

# nn.Embedding modules: their 2-D weights are tables, never Linear weights.
_EMBEDDING_SUFFIXES = ("embed_tokens", "position_embedding")
# The quanto weight class that multiplies by dequantizing the whole weight on every call.
FALLBACK_CLASS = "WeightQBitsTensor"


# --------------------------------------------------------------------------------------------
# which module gets what


@dataclass(frozen=True)
class LayerQuant:
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


def plan_layers(cfg: CogVLMConfig, quant: QuantConfig | None) -> dict[str, LayerQuant]:
    """Module name -> LayerQuant for every Linear that will be quantized (absent = kept in the compute dtype)."""
    if quant is None:
        return {}
    plan = {}
    for name, (_, in_features) in linear_layers(cfg).items():
        dtype, group = quant.resolve(name)
        if dtype == "int4":
            plan[name] = LayerQuant("int4", effective_group_size(in_features, group))
        elif dtype == "int8":
            plan[name] = LayerQuant("int8", None)
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
    shapes: Mapping[str, tuple[int, ...]], plan: Mapping[str, LayerQuant], dtype: torch.dtype
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


def _layout_category(name: str, dt: torch.dtype, plan: Mapping[str, LayerQuant]) -> str:
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
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
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
# which kernel quanto will pick


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
# which layout the weights take on this device (what a cache entry holds; its key)


def device_class(device: torch.device) -> str:
    """What decides the bytes of a kernel's layout besides the weights: `cpu-avx512` (torch's CPU int4
    packing depends on the vector ISA it dispatches to), `cuda-sm90` (kernels and packings per GPU arch)."""
    if device.type == "cpu":
        return f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return device.type


def layer_kernel(
    lp: LayerQuant, shape: tuple[int, int], device: torch.device, dtype: torch.dtype, awq: bool = False
) -> str:
    """The kernel quanto will run for one quantized Linear, hence the layout its weight is kept in:
    `tinygemm-cpu`, `tinygemm-cuda`, `awq`, `fallback` (quanto's portable int4, dequantized per call) or `int8`.

    quanto's `WeightQBitsTensor.create` decides, plus our CPU packer's N % 16;
    `awq`: quanto's CUDA extension is registered.
    """
    if lp.qtype == "int8":
        return "int8"
    n = shape[0]
    if lp.group_size != 128:
        return "fallback"
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if dtype == torch.float16 and major >= 8 and n >= 128 and awq:
            return "awq"
        cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
        if dtype == torch.bfloat16 and major >= 8 and cuda >= (12, 1):
            return "tinygemm-cuda"
        return "fallback"
    if device.type == "cpu" and dtype == torch.bfloat16 and n % 16 == 0:
        return "tinygemm-cpu"
    return "fallback"

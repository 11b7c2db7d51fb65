"""The quantizing loader: a checkpoint streamed into a quantized model, or the quantized-weights cache read back.

Why it looks like this (measured facts about optimum-quanto 0.2.7, which the package pins below 0.3):

* **Streaming.** The fp16 checkpoint of CogVLM2-19B is ~38 GB and its INT4 weights ~10 GB, so the
  full-precision model must never be resident. The model is built on `meta`; every Linear that a rule
  quantizes becomes a quanto `QLinear` while still on meta, and its checkpoint weight is read a block
  of rows at a time, cast to the compute dtype, quantized with quanto's own optimizer and ops, and
  packed straight into its final buffer. Peak memory is the quantized model plus a few MB, even for a
  128256-row `lm_head` (whole-tensor `freeze()` would need ~8 B/param of it transiently).
  Quantization is per row (groups run along the input dimension), so block-wise results are bit-identical
  to `quantize()` + `freeze()` on the whole float model; `tests/unit/quant/test_loader.py` checks it.
* **Portable layout for the cache.** What is written to the cache is quanto's kernel-agnostic layout,
  as each layer is produced; the device kernel's layout (TinyGemm / AWQ) is derived from it block by
  block (on CPU, bf16 group-128 blocks go straight from the codes to TinyGemm's layout). Converting
  a TinyGemm-packed weight back for saving would cost quanto's O(K^2 N) identity matmul.
* **Reloading** builds the quantized skeleton on meta and assigns the cached tensors in file order
  while their checksums are verified; quanto's `requantize()` is not used (it materialises the whole
  float model on the device first). Any doubt about an entry means a warning and quantizing again,
  never a crash and never wrong weights.
* Modules stay oblivious: decisions are made by module name and installed from outside (`skeleton`).

The other pieces of `cogbatch.model.quant`, one job each: `spec` (what to quantize; torch-free), `plan`
(per-layer plan, predicted bytes and kernels; no quanto import, for `cogbatch plan`), `pack` (block-wise
quantization, quanto's portable packing, TinyGemm's CPU layout, the compiler-free unpack), `linear`
(dynamic dequantization, kernel classes, moving packed weights), `skeleton` (the model on meta, quanto
Linears swapped in by name), `cache` (keys, entries, validation, cleanup), `cachefile` (the streamed
safetensors file with per-tensor CRC-32) and `report` (time, memory and bytes of a load).
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.quantize import quantization_map
from optimum.quanto.tensor import WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.packed import PackedTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from torch import nn

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.errors import CacheError
from cogbatch.model.quant.cache import (
    CACHE_FORMAT,
    cache_entry,
    cache_key,
    default_cache_dir,
    plan_json,
    prune_cache,
    read_cache_entry,
)
from cogbatch.model.quant.cachefile import CACHE_WEIGHTS, CacheReader, CacheWriter, Layout, parse_checksums
from cogbatch.model.quant.linear import (
    DequantQLinear,
    kernel_counts,
    move_module,
    resolve_dequant_threshold,
    set_dequant_threshold,
)
from cogbatch.model.quant.pack import (
    CHUNK_ELEMENTS,
    _chunk_rows,
    direct_tinygemm_layout,
    optimize_weight,
    quantize_int4_rows,
    quantize_int4_tinygemm_cpu,
    quantize_int8_rows,
    tinygemm_data_from_portable_cpu,
    tinygemm_repack_blocks,
    tinygemm_tensor,
)
from cogbatch.model.quant.plan import (
    FALLBACK_CLASS,
    LayerQuant,
    describe_int4_kernel,
    plan_layers,
    quantized_state_layout,
)
from cogbatch.model.quant.report import LoadTracker
from cogbatch.model.quant.skeleton import (
    assign_quantized,
    build_skeleton,
    check_no_meta,
    materialize_buffers,
    offload_embeddings,
    placement,
    release_host_memory,
)
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.model.weights import DERIVED_SUFFIXES, LazyTensor, stream_lazy_tensors

log = logging.getLogger("cogbatch.model.quantize")


@dataclass
class QuantizedLoad:
    """One quantized load: the checkpoint it reads, how it quantizes, where the model goes.

    `names` are the checkpoint's tensors in stream order (they fix the cache file's layout); `plan` and
    `layout` follow from the rest.
    """

    model_cls: Callable[[CogVLMConfig], nn.Module]
    cfg: CogVLMConfig
    ckpt: Path
    files: list[Path]
    names: list[str]
    quant: QuantConfig
    dtype: torch.dtype
    device: torch.device
    tracker: LoadTracker
    # Modules under this name prefix are made on `device` (their packing is the device's) and then kept in
    # host memory, one at a time: phase swapping's part that does not run first never fills the device.
    host_prefix: str | None = None
    plan: dict[str, LayerQuant] = field(init=False)
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.plan = plan_layers(self.cfg, self.quant)
        shapes = checkpoint_tensor_shapes(self.cfg)
        self.layout = quantized_state_layout({n: shapes[n] for n in self.names}, self.plan, self.dtype)


@dataclass
class CacheTarget:
    """The cache entry a load reads or writes: its directory, its key and the fields the key hashes."""

    entry: Path
    key: str
    fields: dict[str, Any]


def _quantize_from_checkpoint(load: QuantizedLoad, writer: CacheWriter | None) -> nn.Module:
    """Stream the checkpoint into a quantized skeleton; write the cache as tensors are produced.

    A planned Linear's weight is read a block of rows at a time and quantized; bf16 group-128
    weights on CPU go straight into TinyGemm's layout, the others through quanto's portable layout
    and a block-wise repack. Every other tensor is cast to the compute dtype, big ones by blocks too.
    """
    from accelerate.utils import set_module_tensor_to_device

    dtype, device, tracker = load.dtype, load.device, load.tracker
    model = build_skeleton(load.model_cls, load.cfg, load.plan)
    tracker.reading("checkpoint", sum(f.stat().st_size for f in load.files))
    for src in stream_lazy_tensors(load.files):
        name = src.name
        if name.endswith(DERIVED_SUFFIXES):
            continue
        module_name, _, leaf = name.rpartition(".")
        lp = load.plan.get(module_name)
        if lp is not None and leaf == "weight":
            _stream_quantized_weight(model.get_submodule(module_name), module_name, src, lp,
                                     dtype=dtype, device=device, tracker=tracker, writer=writer)  # fmt: skip
            _park(load, module_name, model.get_submodule(module_name))
        else:
            target = _target(load, name)
            with tracker.phase("read"):
                tensor = _read_cast(src, dtype, target)
                set_module_tensor_to_device(model, name, target, value=tensor, dtype=dtype)
            if writer is not None:
                writer.write(name, tensor)
            del tensor
        release_host_memory(math.prod(src.shape) * 2)
        tracker.read(src.nbytes)
    if writer is not None:
        tracker.times["cache_write"] += writer.seconds
    materialize_buffers(model, device)
    check_no_meta(model)
    return model


def _target(load: QuantizedLoad, name: str) -> torch.device:
    """Where a tensor that is not a quantized weight goes: the host for `host_prefix` (no packing to keep)."""
    if load.host_prefix is not None and name.startswith(load.host_prefix):
        return torch.device("cpu")
    return placement(name, load.quant, load.device)


def _park(load: QuantizedLoad, module_name: str, module: nn.Module) -> None:
    """Copy a quantized module under `host_prefix` to the host as soon as it is made, its packing unchanged."""
    if load.host_prefix is not None and f"{module_name}.".startswith(load.host_prefix):
        move_module(module, "cpu")


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
        assign_quantized(module, weight, dtype, device)
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
    assign_quantized(module, portable, dtype, device)
    if writer is not None:
        writer.write_module(module_name, {k: v for k, v in module.state_dict().items() if k != "bias"})
    with tracker.phase("repack"):
        module.weight = nn.Parameter(optimize_weight(portable), requires_grad=False)


def _cache_reads(
    layout: Layout, plan: Mapping[str, LayerQuant], shapes: Mapping[str, tuple[int, ...]], dtype, device
) -> list[tuple[str, tuple[int, int] | None]]:
    """Every read `_load_from_cache` makes, in file order: whole tensors, or blocks of packed rows for the
    weights that go straight into TinyGemm's CPU layout."""
    reads = []
    for name in layout:
        module = name.removesuffix(".weight._data._data")
        lp = plan.get(module) if module != name else None
        shape = shapes[f"{module}.weight"] if lp is not None else None
        if lp is not None and lp.qtype == "int4" and direct_tinygemm_layout(shape, lp.group_size, dtype, device):
            reads += [(name, rows) for rows in tinygemm_repack_blocks(shape)]
        else:
            reads.append((name, None))
    return reads


def _load_from_cache(load: QuantizedLoad, entry: Path, sidecar: dict[str, Any]) -> nn.Module:
    """Assign the cached tensors to a fresh quantized skeleton, repacking each weight for its kernel.

    Tensors are consumed in file order, as `CacheReader` verifies their checksums.
    """
    from accelerate.utils import set_module_tensor_to_device

    dtype, device, tracker, plan = load.dtype, load.device, load.tracker, load.plan
    model = build_skeleton(load.model_cls, load.cfg, plan)
    shapes = checkpoint_tensor_shapes(load.cfg)
    reads = _cache_reads(load.layout, plan, shapes, dtype, device)
    reader = CacheReader(entry / CACHE_WEIGHTS, parse_checksums(sidecar, list(load.layout)), reads)
    tracker.reading("quantized-weights cache", (entry / CACHE_WEIGHTS).stat().st_size)
    try:

        def get(name: str, target: torch.device = device, rows: tuple[int, int] | None = None) -> torch.Tensor:
            with tracker.phase("cache_read"):
                t = reader.get(name, rows)
                t = t if rows is not None else t.to(target)  # whole tensors: fresh memory of their own
            tracker.read(t.numel() * t.element_size())
            return t

        for name in load.names:
            if name.endswith(DERIVED_SUFFIXES):
                continue
            module_name, _, leaf = name.rpartition(".")
            lp = plan.get(module_name)
            if lp is None or leaf != "weight":
                target = _target(load, name)
                set_module_tensor_to_device(model, name, target, value=get(name, target), dtype=dtype)
                continue
            module = model.get_submodule(module_name)
            n, k = shapes[name]
            p = f"{module_name}.weight."
            layout_cpu = direct_tinygemm_layout((n, k), lp.group_size, dtype, device) if lp.qtype == "int4" else None
            if layout_cpu is not None:
                t0, read_before = time.perf_counter(), tracker.times["cache_read"]
                data = tinygemm_data_from_portable_cpu(
                    lambda r0, r1, name=p + "_data._data": get(name, rows=(r0, r1)), (n, k), layout_cpu
                )
                tracker.times["repack"] += time.perf_counter() - t0 - (tracker.times["cache_read"] - read_before)
                weight = tinygemm_tensor(data, get(p + "_scale"), get(p + "_shift"), (n, k), 128)
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
            assign_quantized(module, weight, dtype, device)
            module.input_scale = get(f"{module_name}.input_scale")
            module.output_scale = get(f"{module_name}.output_scale")
            _park(load, module_name, module)
            release_host_memory(n * k // 2)
        reader.finish()  # every checksum verified before the model is used
    finally:
        reader.close()
    materialize_buffers(model, device)
    check_no_meta(model)
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
    host_prefix: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a quantized model from the cache if a valid entry exists, else by streaming the checkpoint.

    `names` are the checkpoint's tensors in stream order (they fix the cache file's layout).
    `host_prefix`: modules made for `device` but kept in host memory (`QuantizedLoad.host_prefix`).
    Returns the model and the cache facts for the load report.
    """
    load = QuantizedLoad(model_cls, cfg, ckpt, files, names, quant, dtype, device, tracker, host_prefix)
    groups = {lp.group_size for lp in load.plan.values() if lp.qtype == "int4"}
    for g in sorted(groups, key=lambda x: x or 0):
        line, fallback = describe_int4_kernel(device, dtype, g)
        (log.warning if fallback else log.info)("int4 kernel: %s", line)

    cache = {"cache_hit": False, "cache_path": None, "cache_status": "disabled"}
    target = None
    if cache_dir is not False:
        root = Path(cache_dir).expanduser() if cache_dir not in (None, True) else default_cache_dir()
        try:
            key, fields = cache_key(ckpt, files, quant, dtype)
        except (OSError, ValueError, KeyError, struct.error) as e:  # a shard changed under us: no cache, no crash
            log.warning("quantized-weights cache disabled for this load: cannot identify %s (%s)", ckpt, e)
        else:
            target = CacheTarget(cache_entry(root, ckpt, key), key, fields)
            cache["cache_path"] = target.entry

    def from_cache() -> nn.Module | None:
        try:
            sidecar = read_cache_entry(target.entry, target.key, load.layout, load.plan)
            model = _load_from_cache(load, target.entry, sidecar)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as e:  # stale, edited, truncated or unreadable: quantize again, never crash
            reason = str(e) if isinstance(e, CacheError) else f"{type(e).__name__}: {e}"
            log.warning("ignoring the quantized-weights cache %s: %s; quantizing the checkpoint again",
                        target.entry, reason)  # fmt: skip
            cache["cache_status"] = f"stale ({reason}); rebuilt"
            return None
        cache.update(cache_hit=True, cache_status="hit")
        return model

    model = from_cache() if target is not None and target.entry.exists() else None
    if model is None:
        # One builder per entry: processes loading the same model at once (Ray actors, two jobs sharing the
        # cache) wait here, then read what the first one wrote instead of each quantizing it again.
        with _builder_lock(target.entry if target is not None else None):
            if target is not None and cache["cache_status"] == "disabled" and target.entry.exists():
                model = from_cache()
            if model is None:
                model = _build(load, target, cache)
    if host_prefix is not None:  # the parked part's buffers, made on the device at the end of the load
        move_module(model.get_submodule(host_prefix.rstrip(".")), "cpu")
    _place_work(model, load, dequant_threshold, cache)
    return model, cache


def _place_work(model: nn.Module, load: QuantizedLoad, dequant_threshold: Any, cache: dict[str, Any]) -> None:
    """Where each quantized layer's work runs: the CPU embedding table, dynamic dequantization, kernel warnings."""
    device = load.device
    if load.quant.embeddings_on_cpu and device.type != "cpu":
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


def _builder_lock(entry: Path | None) -> Any:
    """An inter-process lock for building one cache entry, kept apart from the entries themselves
    (`<cache>/locks/`), so that listing and pruning entries never meets a lock file."""
    if entry is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    locks = entry.parent.parent / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unusable cache dir: the write fails later and is reported, the load goes on
        return contextlib.nullcontext()
    return FileLock(str(locks / f"{entry.name}.lock"))


def _build(load: QuantizedLoad, target: CacheTarget | None, cache: dict[str, Any]) -> nn.Module:
    """Quantize while streaming the checkpoint, writing the cache entry on the way when there is one."""
    writer = CacheWriter(target.entry, load.layout, target.key) if target is not None else None
    try:
        model = _quantize_from_checkpoint(load, writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        sidecar = {
            "format": CACHE_FORMAT,
            "key": target.key,
            "key_fields": target.fields,
            "source": str(load.ckpt.resolve()),  # not in the key: lets a later entry of this directory replace it
            "quantization": load.quant.to_dict(),
            "layers": plan_json(load.plan),
            "quantization_map": quantization_map(model),
            "dtype": str(load.dtype).removeprefix("torch."),
            "versions": target.fields["versions"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        t0 = time.perf_counter()
        ok = writer.commit(sidecar)
        load.tracker.times["cache_write"] += time.perf_counter() - t0
        if ok:
            prune_cache(target.entry, sidecar)
        if cache["cache_status"] == "disabled":
            cache["cache_status"] = "written" if ok else f"not written ({writer.failed})"
        elif not ok:
            cache["cache_status"] += f"; not written ({writer.failed})"
    return model

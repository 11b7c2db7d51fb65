"""The quantizing loader: a checkpoint streamed into a quantized model, or the quantized-weights cache read back.

Why it looks like this (measured facts about optimum-quanto 0.2.7, which the package pins below 0.3;
timings in docs/performance.md):

* **Streaming.** The fp16 checkpoint of CogVLM2-19B is ~38 GB and its INT4 weights ~10 GB, so the
  full-precision model must never be resident. The model is built on `meta`; every Linear that a rule
  quantizes becomes a quanto `QLinear` while still on meta, and its checkpoint weight is quantized a
  block of rows at a time by worker threads straight into its final buffer, in the layout of the
  kernel that will run it (`stream`, `builders`). Peak memory is the quantized model plus a few MB
  per worker. Quantization is per row (groups run along the input dimension), so block-wise results
  are bit-identical to `quantize()` + `freeze()` on the whole float model (`quantizer`; tested).
* **The cache holds the kernel's layout.** A cache entry stores each weight exactly as the model holds
  it on this device class (TinyGemm's CPU or CUDA packing, AWQ's, quanto's portable layout for the
  dequantize fallback), and the kernel of every layer is part of the key. Loading an entry is
  therefore mapping one file and assigning views of it (on CPU the weights stay in the page cache,
  shared by every process using the entry): no repacking, no quanto `requantize()` (it materialises
  the whole float model on the device first).
* **The run does not wait for the cache** on CPU. A first load returns once the model is built; the
  entry is written from the model's tensors by a background thread (`writeback`). On a GPU the load
  waits for it: the writer keeps device tensors alive until written, which phase swapping must free.
* **Integrity at a small fraction of the read.** Every load checks the sidecar, the file size and the
  safetensors header; the CRC-32 of every tensor is checked when the entry is written and on its first
  use, and on every load with `verify_cache` (`cogbatch quantize --verify`). Any doubt about an entry
  means a warning and quantizing again, never a crash and never wrong weights.
* Modules stay oblivious: decisions are made by module name and installed from outside (`skeleton`).

The other pieces of `cogbatch.model.quant`, one job each: `spec` (what to quantize; torch-free), `plan`
(per-layer plan, kernels, predicted bytes; no quanto import, for `cogbatch plan`), `quantizer` (row
blocks quantized as quanto does, faster), `builders` (one tensor's final buffers by row blocks), `pack`
(TinyGemm's CPU layout, the compiler-free unpack), `linear` (dynamic dequantization, kernel classes,
moving packed weights), `skeleton` (the model on meta, quanto Linears swapped in by name), `stream`
(the worker pool of a first load), `flat` (quantized weights as plain tensors and back), `stfile`
(safetensors files as memory maps), `cache` (keys, entries, validation, cleanup), `cachefile` (an
entry's files), `writeback` (the background write) and `report` (time, memory and bytes of a load).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.errors import CacheError
from cogbatch.model.quant.cache import (
    cache_entry,
    cache_key,
    default_cache_dir,
    plan_json,
    read_cache_entry,
    target_fields,
)
from cogbatch.model.quant.cachefile import open_weights, parse_checksums, record_verified, verify
from cogbatch.model.quant.flat import leaf_names, unflatten
from cogbatch.model.quant.linear import (
    DequantQLinear,
    kernel_counts,
    move_module,
    resolve_dequant_threshold,
    set_dequant_threshold,
)
from cogbatch.model.quant.plan import (
    FALLBACK_CLASS,
    LayerQuant,
    describe_int4_kernel,
    device_class,
    layer_kernel,
    plan_layers,
)
from cogbatch.model.quant.report import LoadTracker
from cogbatch.model.quant.skeleton import (
    assign_quantized,
    assign_tensor,
    build_skeleton,
    check_no_meta,
    materialize_buffers,
    offload_embeddings,
    placement,
)
from cogbatch.model.quant.spec import QuantConfig
from cogbatch.model.quant.stream import stream_quantize, worker_count
from cogbatch.model.quant.writeback import CacheWrite, wait_for_writer

log = logging.getLogger("cogbatch.model.quantize")


@dataclass
class QuantizedLoad:
    """One quantized load: the checkpoint it reads, how it quantizes, where the model goes.

    `names` are the checkpoint's tensors in stream order; `plan` (per-layer dtype and group),
    `kernels` (per-layer kernel on this device, `plan.layer_kernel`) and `layers` (both, as the
    sidecar records them) follow from the rest.
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
    # Modules under this name prefix are made for `device` (a quantized weight packed for its kernel there)
    # and moved to host memory as soon as they are made: the part of a phase-swapped run that does not run
    # first never fills the device, not even while loading.
    host_prefix: str | None = None
    plan: dict[str, LayerQuant] = field(init=False)
    kernels: dict[str, str] = field(init=False)
    layers: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.plan = plan_layers(self.cfg, self.quant)
        shapes = checkpoint_tensor_shapes(self.cfg)
        awq = self.device.type == "cuda" and awq_available()
        self.kernels = {
            name: layer_kernel(lp, shapes[f"{name}.weight"], self.device, self.dtype, awq)
            for name, lp in self.plan.items()
        }
        self.layers = plan_json(self.plan, self.kernels)

    def home(self, name: str) -> torch.device:
        """Where a tensor that is not a quantized weight goes: the host under `host_prefix` (no packing to keep)."""
        if self.host_prefix is not None and name.startswith(self.host_prefix):
            return torch.device("cpu")
        return placement(name, self.quant, self.device)

    def park(self, module_name: str, module: nn.Module) -> None:
        """Copy a just-made quantized module under `host_prefix` to the host, its packing unchanged."""
        if self.host_prefix is not None and f"{module_name}.".startswith(self.host_prefix):
            move_module(module, "cpu")

    def park_buffers(self, model: nn.Module) -> None:
        """Move what `materialize_buffers` made on the device under `host_prefix` (the tower's buffers)."""
        if self.host_prefix is not None:
            move_module(model.get_submodule(self.host_prefix.rstrip(".")), "cpu")


def awq_available() -> bool:
    """Whether quanto's CUDA extension is registered: fp16 int4 on sm80+ then runs its AWQ kernel."""
    from optimum.quanto.library.extensions import is_extension_available

    return is_extension_available("quanto_cuda")


@dataclass
class CacheTarget:
    """The cache entry a load reads or writes: its directory, its key and the fields the key hashes."""

    entry: Path
    key: str
    fields: dict[str, Any]


def _load_from_cache(load: QuantizedLoad, entry: Path, sidecar: dict[str, Any], full_check: bool) -> nn.Module:
    """The model from a cache entry: its file mapped, its tensors assigned as they are (views on CPU).

    The file's size and header are checked against the sidecar on every load; the bytes' checksums on
    the entry's first use (then recorded in the sidecar) and whenever `full_check` asks.
    """
    tracker, device = load.tracker, load.device
    with tracker.phase("cache_read"):
        weights = open_weights(entry, sidecar)
        tracker.reading("quantized-weights cache", weights.size)
        weights.will_need()  # a cold file is read ahead while the skeleton is built
    if full_check or not (sidecar.get("verified") or {}).get("on_first_use"):
        with tracker.phase("verify"):
            names = list(weights.header)
            verify(weights, parse_checksums(sidecar, names), names)
        record_verified(entry, sidecar)
    with tracker.phase("skeleton"):
        model = build_skeleton(load.model_cls, load.cfg, load.plan)
    with tracker.phase("cache_read"):

        def get(name: str, target: torch.device = device) -> torch.Tensor:
            t = weights.tensor(name)
            tracker.read(t.numel() * t.element_size())  # mapped on CPU: its pages come as the model uses them
            return t if target.type == "cpu" else t.to(target)

        structure = sidecar["structure"]
        quantized = set()
        for module_name, tree in structure.items():
            module = model.get_submodule(module_name)
            weight = unflatten(tree, get)
            if tuple(weight.shape) != (module.out_features, module.in_features):
                raise CacheError(f"{module_name}: cached weight {tuple(weight.shape)} does not fit the model")
            assign_quantized(module, weight, load.dtype, device)
            load.park(module_name, module)
            quantized.update(leaf_names(tree))
        for name in sidecar["tensors"]:
            if name not in quantized:
                try:
                    assign_tensor(model, name, get(name, load.home(name)))
                except (ValueError, AttributeError) as e:
                    raise CacheError(str(e)) from None
        materialize_buffers(model, device)
        load.park_buffers(model)
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
    verify_cache: bool = False,
    wait_for_cache: bool = False,
    host_prefix: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a quantized model from the cache if a valid entry exists, else by streaming the checkpoint.

    `names` are the checkpoint's tensors in stream order. `verify_cache`: check every checksum of a
    cached entry (else only on its first use). `wait_for_cache`: return once a new entry is written
    (else it is written in the background). `host_prefix`: modules made for `device` but kept in host
    memory (`QuantizedLoad.host_prefix`). Returns the model and the cache facts for the load report.
    """
    load = QuantizedLoad(model_cls, cfg, ckpt, files, names, quant, dtype, device, tracker, host_prefix)
    groups = {lp.group_size for lp in load.plan.values() if lp.qtype == "int4"}
    for g in sorted(groups, key=lambda x: x or 0):
        line, fallback = describe_int4_kernel(device, dtype, g)
        (log.warning if fallback else log.info)("int4 kernel: %s", line)

    cache: dict[str, Any] = {"cache_hit": False, "cache_path": None, "cache_status": "disabled"}
    target = None
    if cache_dir is not False:
        root = Path(cache_dir).expanduser() if cache_dir not in (None, True) else default_cache_dir()
        try:
            with tracker.phase("cache_key"):
                key, fields = cache_key(ckpt, files, quant, dtype, target_fields(device_class(device), load.kernels))
        except (OSError, ValueError, KeyError, struct.error) as e:  # a shard changed under us: no cache, no crash
            log.warning("quantized-weights cache disabled for this load: cannot identify %s (%s)", ckpt, e)
        else:
            target = CacheTarget(cache_entry(root, ckpt, key), key, fields)
            cache["cache_path"] = target.entry

    def from_cache() -> nn.Module | None:
        try:
            sidecar = read_cache_entry(target.entry, target.key, load.layers)
            model = _load_from_cache(load, target.entry, sidecar, verify_cache)
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
    writer = None
    if model is None:
        # One builder per entry: processes loading the same model at once (Ray actors, two jobs sharing the
        # cache) wait here, then read what the first one wrote instead of each quantizing it again. The
        # lock passes to the background writer, which releases it once the entry is published.
        if target is not None:
            wait_for_writer(target.entry)
        lock = _builder_lock(target.entry if target is not None else None)
        lock.acquire()
        try:
            if target is not None and cache["cache_status"] == "disabled" and target.entry.exists():
                model = from_cache()
            if model is None:
                model, writer = _build(load, target, cache, lock.release)
                lock = None  # the writer releases it
        finally:
            if lock is not None:
                lock.release()
        if writer is not None:
            writer.start()
            # On a GPU the writer holds the device tensors it has not written yet: phase swapping could not
            # free them, so the load waits there (on CPU the model's tensors are the ones written, no copy).
            if wait_for_cache or device.type != "cpu":
                writer.wait()
            cache["cache_status"] = writer.report_status()
            cache["cache_writer"] = writer
    _place_work(model, load, dequant_threshold, cache)
    return model, cache


def _place_work(model: nn.Module, load: QuantizedLoad, dequant_threshold: Any, cache: dict[str, Any]) -> None:
    """Where each quantized layer's work runs: the CPU embedding table, dynamic dequantization, kernel warnings."""
    from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor

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


class _NoLock:
    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def _builder_lock(entry: Path | None) -> Any:
    """An inter-process lock for building one cache entry, kept apart from the entries themselves
    (`<cache>/locks/`), so that listing and pruning entries never meets a lock file. Not bound to a
    thread: the background writer releases it."""
    if entry is None:
        return _NoLock()
    from filelock import FileLock

    locks = entry.parent.parent / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unusable cache dir: the write fails later and is reported, the load goes on
        return _NoLock()
    return FileLock(str(locks / f"{entry.name}.lock"), thread_local=False)


def _build(
    load: QuantizedLoad, target: CacheTarget | None, cache: dict[str, Any], release: Callable[[], None]
) -> tuple[nn.Module, CacheWrite | None]:
    """Quantize while streaming the checkpoint; the entry's writer (not started yet) when there is a cache."""
    tracker = load.tracker
    with tracker.phase("skeleton"):
        model = build_skeleton(load.model_cls, load.cfg, load.plan)
    t0 = time.perf_counter()
    phases = stream_quantize(load, model)
    tracker.times["stream"] += time.perf_counter() - t0
    for phase, seconds in phases.items():
        tracker.times[phase] += seconds
    tracker.workers = worker_count(load.device)
    materialize_buffers(model, load.device)
    load.park_buffers(model)  # before the writer takes the model's tensors: it holds the parked part's host copies
    check_no_meta(model)
    if target is None:
        release()
        return model, None
    return model, CacheWrite(load, target, model, release, cache["cache_status"])

"""The load report: weight bytes by dtype and component, time per phase, peak memory, kernels, cache.

Measured, not predicted: bytes come from the loaded tensors (quantized ones from their inner
tensors), peaks from `/proc/self/status` (VmHWM, and RssAnon sampled by a thread) and
`torch.cuda.max_memory_allocated`. Both the quantized and the plain loader fill one.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogbatch.model.quant.plan import FALLBACK_CLASS, component_of
from cogbatch.model.quant.spec import QuantConfig

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
    """Times the phases of a load and records peak host memory (VmHWM, sampled RssAnon) and device memory.

    It also counts the bytes read for a caller's `progress(what, done, total)`: `reading` names a source
    and its size (the checkpoint, or the quantized-weights cache), `read` adds what the loader consumed.
    """

    def __init__(
        self,
        device: torch.device,
        sample_interval: float = 0.002,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.device = device
        self.progress = progress
        self._source: tuple[str, int] | None = None  # (what, total bytes) being read
        self._done = 0
        self.times: defaultdict[str, float] = defaultdict(float)
        self.interval = sample_interval
        self.total_s = 0.0
        self.cpu_s = 0.0
        self.peak_rss: int | None = None
        self.peak_anon: int | None = None
        self.baseline_anon: int | None = None
        self.peak_device: int | None = None
        self.workers = 1  # threads that shared the quantizing (their phase times are summed)

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
        if exc[0] is None and self._source is not None:  # whatever was not counted (headers): done
            self._done = self._source[1]
            self._report()

    def reading(self, what: str, total: int) -> None:
        """The load starts reading `what` (`total` bytes) from its beginning."""
        self._source, self._done = (what, total), 0
        self._report()

    def read(self, nbytes: int) -> None:
        """`nbytes` more of the source were read (and used)."""
        if self._source is not None:
            self._done = min(self._source[1], self._done + nbytes)
            self._report()

    def _report(self) -> None:
        if self.progress is not None and self._source is not None:
            self.progress(self._source[0], self._done, self._source[1])

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
    pack_s: float
    skeleton_s: float
    cache_key_s: float
    cache_read_s: float
    verify_s: float
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
    workers: int = 1

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_weight_bytes": self.total_weight_bytes}

    def summary(self) -> str:
        """A few human-readable lines for logs and the run summary."""

        def mib(n: int | None) -> str:
            return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"

        phases = [("skeleton", self.skeleton_s), ("cache key", self.cache_key_s), ("cache read", self.cache_read_s),
                  ("checksums", self.verify_s)]  # fmt: skip
        work = [("read", self.read_s), ("quantize", self.quantize_s), ("pack", self.pack_s)]
        split = ", ".join(f"{k} {v:.2f} s" for k, v in phases if v > 0)
        if any(v > 0 for _, v in work):
            threads = f" over {self.workers} threads" if self.workers > 1 else ""
            split += (", " if split else "") + ", ".join(f"{k} {v:.2f} s" for k, v in work if v > 0) + threads
        if self.cache_write_s > 0:
            split += f"; cache write {self.cache_write_s:.2f} s (background)"
        lines = [
            f"loaded {self.checkpoint} on {self.device} ({self.dtype}, {self.quantization}) in {self.total_s:.2f} s "
            f"(CPU {self.cpu_s:.2f} s): " + split,
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
    quanto = _quanto()
    model_device = getattr(model, "device", None)
    for module_name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False))
        skip = module._non_persistent_buffers_set
        tensors += [(n, b) for n, b in module.named_buffers(recurse=False) if n not in skip]
        for name, t in tensors:
            full = f"{module_name}.{name}" if module_name else name
            if quanto is not None and isinstance(t, quanto.tensor.QTensor):
                nbytes = sum(x.numel() * x.element_size() for x in _inner_tensors(t))
                qtype = t.qtype
                category = "int4" if qtype == quanto.qint4 else "int8" if qtype == quanto.qint8 else qtype.name
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


def _quanto() -> Any:
    """optimum.quanto if something imported it, else None: without it no layer can be quantized, and an
    unquantized load need not pay its import (~4 s, it pulls in transformers' model classes)."""
    if "optimum.quanto" not in sys.modules:
        return None
    import optimum.quanto
    import optimum.quanto.tensor

    return optimum.quanto


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
    cache_writer: Any = None,
) -> LoadReport:
    """The report of a finished load; a background cache write (`cache_writer`) updates it when it ends."""
    by_dtype, by_component, on_cpu = weight_bytes(model)
    kernels = {}
    if _quanto() is not None:  # a model with quantized layers: quanto was imported to build it
        from cogbatch.model.quant.linear import kernel_counts

        kernels = kernel_counts(model)
    unquantized = sum(1 for m in model.modules() if type(m) is nn.Linear)
    t = tracker.times
    report = LoadReport(
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
        pack_s=t["pack"],
        skeleton_s=t["skeleton"],
        cache_key_s=t["cache_key"],
        cache_read_s=t["cache_read"],
        verify_s=t["verify"],
        cache_write_s=0.0,
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
        workers=tracker.workers,
    )
    if cache_writer is not None:
        cache_writer.attach(report)
    return report

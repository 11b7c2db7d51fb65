"""The cache entry of a freshly quantized model, written by a background thread while the run goes on.

The model's own tensors are written as they are (no copy on CPU, one tensor at a time to the host
from a GPU), so on CPU the run waits for none of it: the load returns as soon as the model is built
(on a GPU the loader waits: the writer keeps device tensors alive that phase swapping must free). The
writer holds the entry's builder lock until the entry is published, so a second process loading the
same model at the same time waits and then reads the entry instead of quantizing again. The thread
is not a daemon: at exit, the interpreter lets it finish (a killed process leaves a temp dir that the
next write removes, never a half entry; `cachefile.write_entry`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimum.quanto.nn import QModuleMixin
from optimum.quanto.quantize import quantization_map
from torch import nn

from cogbatch.model.errors import CacheError
from cogbatch.model.quant.cache import CACHE_FORMAT, plan_json, prune_cache
from cogbatch.model.quant.cachefile import write_entry
from cogbatch.model.quant.flat import flatten, kernel_of
from cogbatch.model.weights import DERIVED_SUFFIXES

if TYPE_CHECKING:
    from cogbatch.model.quant.loader import CacheTarget, QuantizedLoad

log = logging.getLogger("cogbatch.model.quantize")

WRITING = "writing in the background"

# Writers of this process by entry: a load of an entry being written here waits for its writer before
# taking the builder lock (the writer holds it on this process's behalf; a file lock cannot wait for its
# own process).
_in_flight: dict[Path, CacheWrite] = {}
_in_flight_lock = threading.Lock()


def wait_for_writer(entry: Path) -> None:
    """Wait until this process is not writing `entry` (a no-op when it is not)."""
    with _in_flight_lock:
        writer = _in_flight.get(entry)
    if writer is not None:
        writer.wait()


def cache_contents(load: QuantizedLoad, model: nn.Module) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """([(name, tensor)] in checkpoint order, {layer: weight structure}): what an entry of this model holds.

    Raises CacheError when a layer's weight is not in the layout its kernel predicted (the key says
    which kernels an entry holds, so such an entry would lie).
    """
    tensors, structure = [], {}
    for name in load.names:
        if name.endswith(DERIVED_SUFFIXES):
            continue
        module_name, _, leaf = name.rpartition(".")
        if module_name in load.plan and leaf == "weight":
            module = model.get_submodule(module_name)
            assert isinstance(module, QModuleMixin)
            kernel = kernel_of(module.weight, load.device)  # a parked weight is on the host
            if kernel != load.kernels[module_name]:
                raise CacheError(f"{module_name}: built for {kernel}, predicted {load.kernels[module_name]}")
            structure[module_name], leaves = flatten(module.weight, name)
            tensors += leaves
        else:
            module = model.get_submodule(module_name)
            tensor = module._parameters.get(leaf, module._buffers.get(leaf))
            tensors.append((name, tensor.data if isinstance(tensor, nn.Parameter) else tensor))
    return tensors, structure


class CacheWrite:
    """One entry being written: `start()` the thread, `wait()` for it, `attach(report)` to get its outcome."""

    def __init__(
        self, load: QuantizedLoad, target: CacheTarget, model: nn.Module, release: Callable[[], None], before: str
    ) -> None:
        self.entry: Path = target.entry
        self.status = WRITING
        self._before = before  # why the load quantized: a stale entry's reason, or "disabled" (no entry)
        self.seconds = 0.0
        self._release = release
        self._report: Any = None
        self._lock = threading.Lock()
        try:
            self._tensors, structure = cache_contents(load, model)
        except CacheError as e:
            self._tensors = None
            self._finish(f"not written ({e})")
            return
        self._key = target.key
        self._sidecar = {
            "format": CACHE_FORMAT,
            "key": target.key,
            "key_fields": target.fields,
            "source": str(load.ckpt.resolve()),  # not in the key: lets a later entry of this directory replace it
            "quantization": load.quant.to_dict(),
            "layers": plan_json(load.plan, load.kernels),
            "structure": structure,
            "quantization_map": quantization_map(model),
            "dtype": str(load.dtype).removeprefix("torch."),
            "versions": target.fields["versions"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._thread = threading.Thread(target=self._run, name="cogbatch-cache-write", daemon=False)

    def start(self) -> None:
        if self._tensors is not None:
            with _in_flight_lock:
                _in_flight[self.entry] = self
            self._thread.start()

    def wait(self) -> None:
        """Block until the entry is published (or failed)."""
        if self._tensors is not None and self._thread.ident is not None:
            self._thread.join()

    def attach(self, report: Any) -> None:
        """Keep `report` (a LoadReport) up to date: its cache status and write time change when the write ends."""
        with self._lock:
            self._report = report
            self._apply()

    def _run(self) -> None:
        t0 = time.perf_counter()
        status = "not written (interrupted)"
        try:
            side = write_entry(self.entry, self._tensors, self._sidecar, key=self._key)
            status = "written"
            log.info("quantized-weights cache written: %s (%.1f s)", self.entry, time.perf_counter() - t0)
            prune_cache(self.entry, side)
        except Exception as e:  # a cache that cannot be written never stops a run
            log.warning("could not write the quantized-weights cache %s (%s); going on without it", self.entry, e)
            status = f"not written ({type(e).__name__}: {e})"
        finally:
            self._tensors = None  # the model's tensors are the model's alone again
            self.seconds = time.perf_counter() - t0
            self._finish(status)

    def _finish(self, status: str) -> None:
        try:
            self._release()
        finally:
            with _in_flight_lock:
                if _in_flight.get(self.entry) is self:
                    del _in_flight[self.entry]
            with self._lock:
                self.status = status
                self._apply()

    def report_status(self) -> str:
        """`written`, `writing in the background` or what went wrong, after a stale entry's reason if any."""
        if self._before == "disabled":
            return self.status
        return self._before if self.status == "written" else f"{self._before}; {self.status}"

    def _apply(self) -> None:
        if self._report is not None:
            self._report.cache_status = self.report_status()
            self._report.cache_write_s = self.seconds

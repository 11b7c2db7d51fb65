"""Where the model's parts are: phase swapping between the vision tower and the language model, device memory.

In swap mode only the part of the model in use stays on the device: the vision tower while the chunk's
images are encoded, the language model while they are decoded. The model names its own parts
(`vision_tower`, `language_parts`); modules the loader left in host memory on purpose (the token
embeddings with `embeddings_on_cpu`) never move.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from cogbatch.errors import DoesNotFit

log = logging.getLogger("cogbatch")


class PhasePlacement:
    """Moves the model's parts for each phase; `place` returns the seconds the move took."""

    def __init__(self, model: Any, device: Any) -> None:
        self.device = device
        self.vision = model.vision_tower
        self.host_modules = {id(m) for m in model.modules() if _on_host(m, device)}
        self.language = model.language_parts()
        # A tower parked in host memory at load (`load_model`): the language part is what is on the device.
        self.current = "language" if _on_host_tree(self.vision, device) else "resident"

    def place(self, phase: str, mode: str) -> float:
        """`phase` is "vision" or "language"; outside swap `mode` every part stays (or comes back) on the device."""
        import torch

        want = phase if mode == "swap" else "resident"
        if self.device.type == "cpu" or want == self.current:
            return 0.0
        language = [m for m in self.language if id(m) not in self.host_modules]
        off = {"vision": language, "language": [self.vision], "resident": []}[want]
        on = {"vision": [self.vision], "language": language, "resident": [self.vision, *language]}[want]
        # Packed quantized weights are copied as they are: `Module.to` would repack them (seconds per layer).
        from cogbatch.model.quant.linear import move_module

        t0 = time.perf_counter()
        for m in off:
            move_module(m, "cpu")
        if off and self.device.type == "cuda":
            # The part moving in has other block sizes than the part that left: without handing the
            # cached blocks back, the allocator reserves new segments beside them (fragmentation).
            torch.cuda.empty_cache()
        for m in on:
            move_module(m, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.current = want
        return time.perf_counter() - t0


def load_model(cfg: Any, park_vision: bool | None = None, use_cache: bool = True, progress: Any = None) -> Any:
    """The job's model; on a GPU, with the vision tower kept in host memory when the run will swap phases.

    Loading both parts onto the device first would make the load the run's peak (all weights at
    once, which is what phase swapping exists to avoid). The mode is not known before the weights
    are measured, so `park_vision=None` takes the plan `cogbatch plan` makes from config.json; the
    run's own plan rarely differs, and a tower parked for a run that turns out resident comes over
    with its first chunk. The same plan decides `embeddings_on_cpu: auto` (the token table in host
    memory for a run that would otherwise swap or not fit). `progress`: see `CogVLM.from_pretrained`.
    """
    report = None
    if cfg.source.torch_device().type == "cuda":
        prefer_expandable_segments()
        report = _plan_before_load(cfg)
    if report is not None and cfg.quantization.embeddings_on_cpu is None:  # auto: as `cogbatch plan` decides
        quant = dataclasses.replace(cfg.quantization, embeddings_on_cpu=report.embeddings_on_cpu)
        cfg = dataclasses.replace(cfg, quantization=quant)
    if park_vision is None:
        park_vision = report is not None and report.plan.get("mode") == "swap"
    if park_vision and awq_weights(cfg):
        raise DoesNotFit(
            "this run must swap the vision tower and the language model on the GPU to stay under "
            f"vram_ceiling, but {AWQ_PINNED}"
        )
    return cfg.source.load(use_cache=use_cache, progress=progress, park_vision=park_vision)


AWQ_PINNED = (
    "fp16 int4 on compute capability 8.0+ runs quanto's AWQ kernel, whose weights cannot leave the GPU: use "
    "dtype: bf16 (or auto), a larger vram_ceiling, or quantization rules with another group size (docs/dryrun.md)"
)


def weights_stay_on_device(model: Any) -> bool:
    """Whether the loaded model holds weights that cannot be moved off the GPU (quanto's AWQ packing, `awq_weights`).

    Such a run is planned resident only: the load refuses a run predicted to swap, and this keeps a later
    plan (calibration, an out-of-memory error) from switching to swapping in the middle of the run.
    """
    report = getattr(model, "load_report", None)
    return bool(report is not None and report.kernels.get("AWQWeightQBitsTensor"))


def awq_weights(cfg: Any) -> bool:
    """Whether a load of this job gives int4 layers quanto's AWQ kernel (fp16, group 128, sm80+, its CUDA build).

    quanto 0.2.7 keeps AWQ weights in a packing that asserts a CUDA device and that its own unflatten cannot
    parse, so they can be neither parked in host memory nor swapped between phases.
    """
    import torch

    source, quant = cfg.source, cfg.source.quantized
    device = source.torch_device()
    if quant is None or device.type != "cuda" or source.compute_dtype() != "float16":
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    groups = [quant.group_size] if quant.default == "int4" else []
    groups += [r.group_size or quant.group_size for r in quant.rules if r.dtype == "int4"]
    if 128 not in groups:
        return False
    from cogbatch.model.quant.loader import awq_available

    return awq_available()


def prefer_expandable_segments() -> bool:
    """Ask CUDA's caching allocator for expandable segments, unless the user configured it or CUDA has started.

    A phase switch frees one part's weights and allocates the other's, in blocks of other sizes; with
    fixed-size segments the allocator reserves new segments beside cached ones that do not fit
    (docs/dryrun.md, "Measured"). Only when neither PYTORCH_CUDA_ALLOC_CONF nor PYTORCH_ALLOC_CONF
    is set, and before the load: the environment variable while CUDA has not started, else torch's
    runtime setter (it applies to the segments created from then on).
    """
    import os

    import torch

    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    setting = "expandable_segments:True"
    if not torch.cuda.is_initialized():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = setting
        return True
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:
        return False
    setter(setting)
    return True


def _plan_before_load(cfg: Any) -> Any:
    """What `cogbatch plan` predicts for a GPU job from config.json: the mode, and where `auto` puts the
    token embeddings (None when there is no config to plan from: everything then loads onto the device)."""
    from cogbatch.model.errors import CogbatchError
    from cogbatch.planning.report import plan_report

    try:
        return plan_report(cfg)
    except CogbatchError as e:
        log.debug("no plan before the load (%s): the vision tower and the embeddings load onto the device", e)
        return None


def _on_host_tree(module: Any, device: Any) -> bool:
    """A module with parameters, all of them in host memory, while the model runs on a GPU."""
    params = list(module.parameters())
    return device.type != "cpu" and bool(params) and all(p.device.type == "cpu" for p in params)


def _on_host(module: Any, device: Any) -> bool:
    """A module whose own parameters the loader left on the CPU while the model runs on a GPU."""
    params = list(module.parameters(recurse=False))
    return device.type != "cpu" and bool(params) and all(p.device.type == "cpu" for p in params)


class DeviceMeter:
    """Wall time of one phase, and with `peak` its device memory; on CUDA it synchronises at the phase's ends only.

    Measuring the peak resets CUDA's peak statistics at the phase start (the load's own peak, or
    the other phase's, must not count), so the worker measures only until it has calibrated.
    """

    def __init__(self, device: Any, peak: bool) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self.peak = peak and self.cuda
        if self.cuda:
            torch.cuda.synchronize(device)
        if self.peak:
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.t = time.perf_counter()

    def stop(self) -> tuple[float, int | None]:
        """(seconds, device bytes allocated beyond what the phase started with, or None)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.t
        return seconds, torch.cuda.max_memory_allocated(self.device) - self.base if self.peak else None


def usable_ceiling(ceiling: int, device: Any) -> int:
    """The ceiling the planner may use on `device`: `vram_ceiling`, or what the GPU can still give if less.

    `vram_ceiling` is 11 GiB by default whatever the card; on an 8 GiB card, or one another process
    shares, a plan for 11 GiB would run out of memory batch after batch. Called with the weights
    loaded: what this process holds (torch's reserved memory) plus what is free is the most it can reach.
    """
    import torch

    if device.type != "cuda":
        return ceiling
    free, total = torch.cuda.mem_get_info(device)
    reachable = free + torch.cuda.memory_reserved(device)
    if ceiling <= reachable:
        return ceiling
    gib = 2**30
    log.warning(
        "vram_ceiling %.2f GiB is more than this process can use on %s (%.2f GiB: %.2f free + %.2f held by "
        "cogbatch, of %.2f GiB); planning for %.2f GiB",
        ceiling / gib, device, reachable / gib, free / gib, (reachable - free) / gib, total / gib, reachable / gib,
    )  # fmt: skip
    return reachable

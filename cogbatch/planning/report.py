"""`cogbatch plan`: predicted device memory of a job's model and the batches that fit, from config.json alone."""

from __future__ import annotations

from cogbatch.errors import DoesNotFit
from cogbatch.job.config import JobConfig
from cogbatch.planning.batches import plan_batches, plan_mode
from cogbatch.planning.memory import GiB, MemoryModel, planned_dense_copies
from cogbatch.results import PlanReport


def plan_report(job: JobConfig, max_text: int = 128) -> PlanReport:
    """`cogbatch plan`: predicted device memory of a job's model and the batches that fit, from config.json alone.

    Weight bytes come from the checkpoint's tensor shapes under the job's quantization rules (no
    weights are read); both execution modes are reported so a user sees what phase swapping buys.
    """
    import torch

    from cogbatch.model.quant.plan import predict_weight_bytes
    from cogbatch.model.settings import torch_dtype

    source = job.source
    cfg = source.config()
    device = source.torch_device()
    dtype = torch_dtype(source.compute_dtype())
    notes = []
    if device.type == "cuda" and not torch.cuda.is_available() and job.dtype == "auto":  # a laptop or login node
        notes.append("no CUDA device here: planned for bf16, what dtype auto picks on an Ampere or newer GPU "
                     "(set dtype: fp16 for an older one)")  # fmt: skip
    if job.device == "auto" and device.type == "cpu":
        notes.append("device auto on a machine without CUDA: planned for the CPU (--device cuda plans for a GPU)")
    quant = job.quantization.effective()
    weights = predict_weight_bytes(cfg, quant, dtype)
    max_new = max(t.generation.max_new_tokens for t in job.tasks)
    dense = planned_dense_copies(cfg, quant, device.type, dtype)
    mm = MemoryModel(
        cfg,
        torch.finfo(dtype).bits // 8,
        weights["vision"],
        weights["device"] - weights["vision"],
        materialized_attention=device.type != "cuda",
        dense_vision=dense["vision"],
        dense_language=dense["language"],
    )
    overrun = mm.context_overrun(max_text, max_new)
    if overrun:
        notes.append(overrun)
    if dense["language"] or dense["vision"]:
        notes.append(f"quantized layers expand to a dense copy per call: up to {dense['language'] / GiB:.2f} GiB "
                     f"(language) / {dense['vision'] / GiB:.2f} GiB (vision), counted in each phase")  # fmt: skip
    modes = {}
    for mode, both in (("resident", True), ("swap", False)):
        peak1 = max(mm.decode_peak(1, max_text, max_new, both), mm.encode_peak(1, both))
        largest = plan_mode(mm, job.vram_ceiling, max_text, max_new, 256, None, mode)
        slots = largest.slots if largest else 0
        modes[mode] = {"peak_bytes_batch_1": peak1, "fits": slots > 0, "largest_batch": slots}
    try:
        chosen = plan_batches(mm, job.vram_ceiling, max_text, max_new, cap=job.batch_size or 64).to_dict()
    except DoesNotFit as e:
        chosen = {"mode": None, "error": str(e)}
    return PlanReport(
        model=job.model,
        generation=cfg.generation,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        quantization=job.quantization.label(),
        vram_ceiling=job.vram_ceiling,
        weights=weights,
        per_request={
            "kv_cache_bytes": mm.kv(mm.prefix_tokens + max_text + max_new),
            "image_prefix_bytes": mm.kv(mm.prefix_tokens),
            "vision_activation_bytes_per_image": mm.vision_activations(1),
            "assumed_prompt_tokens": max_text,
            "max_new_tokens": max_new,
        },
        dense_copy_bytes=dense,
        modes=modes,
        plan=chosen,
        notes=notes,
    )

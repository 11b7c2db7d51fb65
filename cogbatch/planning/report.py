"""`cogbatch plan`: predicted device memory of a job's model and the batches that fit, from config.json alone.

Nothing is downloaded and no image is read (`planning.configs`); the card may be this machine's or one
named with `--gpu` / `--vram` (`planning.gpus`), whose compute capability decides the dtype and whether
int4 layers get the fused kernel. Both execution modes are reported, with and without
`embeddings_on_cpu`, so a user sees what phase swapping and a host-side embedding table buy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cogbatch.errors import DoesNotFit
from cogbatch.job.config import JobConfig
from cogbatch.planning.batches import DEFAULT_MAX_TEXT, plan_batches, plan_mode
from cogbatch.planning.configs import plan_config
from cogbatch.planning.gpus import PlanTarget
from cogbatch.planning.memory import GiB, MemoryModel, planned_dense_copies, shares_prefixes
from cogbatch.results import PlanReport


def plan_report(
    job: JobConfig, target: PlanTarget | None = None, ceiling: int | None = None, jobless: bool = False
) -> PlanReport:
    """`cogbatch plan`: what fits, in which mode and at what batch, for `job` on this machine or on `target`.

    `ceiling` replaces the job's `vram_ceiling` (a card's usable memory); `jobless`: the job is the
    defaults of `--model` alone, so its prompt says nothing about real prompt lengths.
    """
    import torch

    from cogbatch.model.quant.plan import predict_weight_bytes

    cfg, config_note = plan_config(job.model)
    device = torch.device("cuda") if target is not None else job.source.torch_device()
    capability = _capability(device, target)
    dtype, notes = _dtype(job, device, target, capability)
    ceiling = job.vram_ceiling if ceiling is None else ceiling
    if target is not None and job.vram_ceiling < ceiling:
        notes.append(f"a run plans under vram_ceiling {job.vram_ceiling / GiB:.2f} GiB (the job's or pipeline.yaml's):"
                     f" set vram_ceiling: {ceiling // 2**20}MiB to use this card")  # fmt: skip
    if jobless:
        max_text, prompt_source = DEFAULT_MAX_TEXT, "the planner's default: no job file"
    else:
        max_text, prompt_source = prompt_tokens(job)
    max_new = max(t.generation.max_new_tokens for t in job.tasks)
    quant = job.quantization.effective()
    dense = planned_dense_copies(cfg, quant, device.type, dtype, capability)  # Linears only: the same for both
    dtype_bytes = torch.finfo(dtype).bits // 8
    variants, models = [], []
    for on_cpu in (False, True):  # the table on the device, and in host memory
        q = dataclasses.replace(job.quantization, embeddings_on_cpu=on_cpu).effective() if quant else None
        w = predict_weight_bytes(cfg, q, dtype)
        vm = _memory_model(cfg, w, dense, dtype_bytes, device.type, job.quantization.kv_cache)
        vm.shared_prefixes = shares_prefixes(job.tasks)  # the same for both variants
        v_modes, v_plan = _modes(vm, ceiling, max_text, max_new, job.batch_size or 64)
        models.append((w, vm, v_modes, v_plan))
        variants.append({"embeddings_on_cpu": on_cpu, "weights_device_bytes": w["device"], "modes": v_modes,
                         "plan": {k: v_plan.get(k) for k in ("mode", "slots", "error")}})  # fmt: skip
    on_cpu = _embeddings_choice(quant, device.type, models[0][3].get("mode"))
    weights, mm, modes, chosen = models[int(on_cpu)]
    if overrun := mm.context_overrun(max_text, max_new):
        notes.append(overrun)
    if dense["language"] or dense["vision"]:
        notes.append(f"quantized layers expand to a dense copy per call: up to {dense['language'] / GiB:.2f} GiB "
                     f"(language) / {dense['vision'] / GiB:.2f} GiB (vision), counted in each phase")  # fmt: skip
    return PlanReport(
        model=job.model,
        generation=cfg.generation,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        quantization=job.quantization.label(),
        vram_ceiling=ceiling,
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
        target=target.to_dict() if target is not None else None,
        int4_kernel=_int4_kernel(device.type, dtype, capability, quant) if quant is not None else None,
        config_source=config_note,
        prompt_tokens_source=prompt_source,
        embeddings_on_cpu=on_cpu,
        embeddings_auto=quant is not None and quant.embeddings_on_cpu is None,
        variants=variants,
        basis=_basis(mm, chosen, max_text, max_new),
        dryrun=_dryrun(cfg, dtype, capability, chosen, device.type),
    )


def _basis(mm: MemoryModel, plan: dict, max_text: int, max_new: int) -> dict[str, dict[str, int]]:
    """What the plan's peak is made of, per phase (empty when nothing fits)."""
    if not plan.get("mode"):
        return {}
    both = plan["mode"] == "resident"
    return {
        "language": mm.decode_parts(plan["slots"], max_text, max_new, both),
        "vision": mm.encode_parts(plan["encode_batch"], both),
    }


def _dryrun(cfg: Any, dtype: Any, capability: Any, plan: dict, device_type: str) -> dict | None:
    """The fake-CUDA dry run's figures nearest to this plan (`planning.calibration`), on a GPU plan only."""
    from cogbatch.planning.calibration import dryrun_reference

    if device_type != "cuda" or not plan.get("mode"):
        return None
    return dryrun_reference(cfg, str(dtype).removeprefix("torch."), capability, plan["mode"], plan["slots"])


def _embeddings_choice(quant: Any, device_type: str, mode_on_device: str | None) -> bool:
    """Where the token embedding table goes: the job's setting, or with `auto` the host when the run must swap.

    A run that must swap the vision tower and the language model over PCIe (or does not fit at all) is
    short of device memory; the table (CogVLM2: 0.98 GiB in bf16) only serves a row lookup per token,
    which the host does for the price of copying the looked-up rows (a few MB per image prefix, kB per
    decode step), so `auto` moves it there first. A run that fits resident keeps it on the device.
    Only a quantized load can place it.
    """
    if quant is None:
        return False
    if quant.embeddings_on_cpu is not None:
        return quant.embeddings_on_cpu
    return device_type == "cuda" and mode_on_device != "resident"


def _memory_model(
    cfg: Any, weights: dict[str, Any], dense: dict[str, int], dtype_bytes: int, device: str, kv_dtype: str
) -> MemoryModel:
    return MemoryModel(
        cfg,
        dtype_bytes,
        weights["vision"],
        weights["device"] - weights["vision"],
        materialized_attention=device != "cuda",
        dense_vision=dense["vision"],
        dense_language=dense["language"],
        kv_dtype=kv_dtype,
    )


def _modes(mm: MemoryModel, ceiling: int, max_text: int, max_new: int, cap: int) -> tuple[dict, dict]:
    """Per mode: the peak of one request, whether it fits, the largest batch; and the plan a run starts with."""
    modes = {}
    for mode, both in (("resident", True), ("swap", False)):
        peak1 = max(mm.decode_peak(1, max_text, max_new, both), mm.encode_peak(1, both))
        largest = plan_mode(mm, ceiling, max_text, max_new, 256, None, mode)
        slots = largest.slots if largest else 0
        modes[mode] = {"peak_bytes_batch_1": peak1, "fits": slots > 0, "largest_batch": slots}
    try:
        chosen = plan_batches(mm, ceiling, max_text, max_new, cap=cap).to_dict()
    except DoesNotFit as e:
        chosen = {"mode": None, "error": str(e)}
    return modes, chosen


def _capability(device: Any, target: PlanTarget | None) -> tuple[int, int] | None:
    """The compute capability planned for: the named card's, else this machine's GPU's, else unknown."""
    if target is not None:
        return target.capability
    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device)
    return None


def _dtype(job: JobConfig, device: Any, target: PlanTarget | None, capability: Any) -> tuple[Any, list[str]]:
    """The compute dtype a run would use there (`dtype: auto`: bf16 from sm80 on, fp16 before), and why."""
    import torch

    from cogbatch.model.settings import torch_dtype

    notes = []
    if target is None:
        dtype = torch_dtype(job.source.compute_dtype())
        if device.type == "cuda" and not torch.cuda.is_available() and job.dtype == "auto":  # a laptop, a login node
            notes.append("no CUDA device here: planned for bf16, what dtype auto picks on an Ampere or newer GPU "
                         "(set dtype: fp16 for an older one, or name the card with --gpu)")  # fmt: skip
        if job.device == "auto" and device.type == "cpu":
            notes.append("device auto on a machine without CUDA: planned for the CPU (--device cuda or --gpu NAME "
                         "plans for a GPU)")  # fmt: skip
        return dtype, notes
    if job.dtype != "auto":
        dtype = torch_dtype(job.dtype)
        if dtype == torch.bfloat16 and capability is not None and capability < (8, 0):
            notes.append("bf16 before sm80 is emulated and slow, with no fused int4 kernel (dtype auto picks fp16)")
        return dtype, notes
    if capability is None:
        notes.append("no --capability: planned for bf16, as on sm80 and newer (give --capability for an older card)")
        return torch.bfloat16, notes
    return (torch.bfloat16 if capability >= (8, 0) else torch.float16), notes


def _int4_kernel(device: str, dtype: Any, capability: Any, quant: Any) -> str:
    """What an int4 group-128 layer multiplies with there, in the planner's terms."""
    import torch

    name = str(dtype).removeprefix("torch.")
    if quant.default != "int4" and not any(r.dtype == "int4" for r in quant.rules):
        return "no int4 layers"
    if device == "cpu":
        fused = "TinyGemm (bf16) up to 256 rows, " if dtype == torch.bfloat16 else ""
        return f"{fused}a dense copy per call above (dynamic dequantization)"
    if capability is not None and capability < (8, 0):
        return f"dense copy per call (no fused int4 kernel before sm80; sm{capability[0]}{capability[1]})"
    if dtype == torch.bfloat16:
        return "TinyGemm (bf16, sm80+)"
    return f"dense copy per call ({name}: planned as quanto's fallback)"


def prompt_tokens(job: JobConfig) -> tuple[int, str]:
    """The prompt tokens a run plans for, known without a tokenizer, and how that was decided.

    A run plans for 128 tokens and plans again when it meets a longer prompt. A fixed prompt has at
    most as many tokens as its template's text has UTF-8 bytes, plus one (byte-level BPE never makes more
    tokens than bytes; SentencePiece with byte fallback adds at most a leading word marker); a prompt
    with `{placeholders}` or from a manifest column is not known before the run.
    """
    from cogbatch.model.prompts import history_to_prompt

    bounds, unknown = {}, []
    for t in job.tasks:
        if t.prompt is None or t.placeholders:
            unknown.append(t.name)
        else:
            bounds[t.name] = len(history_to_prompt(t.prompt, (), t.template).encode()) + 1
    longest = max(bounds, key=bounds.get, default=None)
    parts = []
    if longest is not None:
        parts.append(f"the longest fixed prompt, {longest!r}, has at most {bounds[longest]} tokens")
    if unknown:
        parts.append(f"{', '.join(repr(n) for n in unknown)} not known before the run (placeholders or a column)")
    if longest is not None and bounds[longest] > DEFAULT_MAX_TEXT:
        return bounds[longest], "; ".join(parts)
    return DEFAULT_MAX_TEXT, "the planner's default; " + "; ".join(parts)

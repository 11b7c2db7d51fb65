"""Batch planning: the largest batch whose predicted peak stays under the ceiling, and the execution mode.

`BatchPlan` is what the worker runs by (decode slots, vision batch, images per chunk); it is re-planned
when the run learns more (longer prompts, an out-of-memory error, the first chunk's measured peaks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cogbatch.errors import DoesNotFit
from cogbatch.planning.memory import GiB, MemoryModel

DEFAULT_MAX_TEXT = 128  # prompt tokens a run plans for until it sees longer prompts (also `cogbatch plan`'s)
REASONABLE_BATCH = 4  # resident mode is kept when it decodes this many sequences together
MAX_CHUNK_IMAGES = 64  # host memory per chunk: decoded pixels and features, ~40 MB per CogVLM2 image


@dataclass
class BatchPlan:
    mode: str  # "resident": every weight stays on the device; "swap": vision and language take turns
    slots: int  # sequences decoded together
    encode_batch: int  # images per vision-tower pass
    chunk_images: int  # images per `ModelWorker.process` call: one vision phase, then one continuous decoder
    peak_bytes: int
    ceiling: int
    per_request_bytes: int  # KV cache of one sequence (prefix + prompt + max_new_tokens)
    max_text: int = DEFAULT_MAX_TEXT  # prompt tokens planned for
    max_new: int = 256  # new tokens planned for
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chunk_images_for(slots: int) -> int:
    """Images per chunk: at least two requests per slot even with one task, so a finished sequence
    always has a successor (continuous refill), and up to four while the chunk stays <= 64 images."""
    return max(2 * slots, min(4 * slots, MAX_CHUNK_IMAGES))


def plan_batches(
    mm: MemoryModel,
    ceiling: int,
    max_text: int,
    max_new: int,
    cap: int = 64,
    encode_cap: int | None = None,
    modes: tuple[str, ...] = ("resident", "swap"),
) -> BatchPlan:
    """The largest batch whose predicted peak stays under `ceiling`, and the execution mode.

    Every weight stays resident when that fits a batch of at least `REASONABLE_BATCH` (4), or of
    as many sequences as phase swapping would allow: swapping moves the language model and the
    vision tower over PCIe for every chunk. Otherwise phase swapping is used when it fits (the
    model does not fit with both parts resident and a reasonable batch). `cap` bounds the batch
    (the job's `batch_size`), `encode_cap` the vision batch (lowered after an out-of-memory error);
    `modes` the modes the model's weights allow (quanto's AWQ weights cannot leave the GPU: resident only).
    """
    resident, swap = (
        plan_mode(mm, ceiling, max_text, max_new, cap, encode_cap, m) if m in modes else None
        for m in ("resident", "swap")
    )
    if resident and (swap is None or resident.slots >= min(REASONABLE_BATCH, swap.slots)):
        return resident
    if swap:
        if resident:
            swap.notes.append(f"with every weight resident only a batch of {resident.slots} fits")
        return swap
    need = min(
        max(mm.decode_peak(1, max_text, max_new, both), mm.encode_peak(1, both))
        for both in (m == "resident" for m in modes)
    )
    raise DoesNotFit(
        f"the model needs about {need / GiB:.2f} GiB for a single request "
        f"(weights {(mm.weights_vision + mm.weights_language) / GiB:.2f} GiB), but the ceiling is "
        f"{ceiling / GiB:.2f} GiB; raise vram_ceiling, quantize more (int4), or use a bigger device"
    )


def plan_mode(
    mm: MemoryModel, ceiling: int, max_text: int, max_new: int, cap: int, encode_cap: int | None, mode: str
) -> BatchPlan | None:
    """The largest batch in one execution mode, or None when a single request does not fit."""
    both = mode == "resident"

    def peak(s: int) -> int:
        return max(mm.decode_peak(s, max_text, max_new, both), mm.encode_peak(1, both))

    if peak(1) > ceiling:
        return None
    slots = 1
    while slots < cap and peak(slots + 1) <= ceiling:
        slots += 1
    chunk = chunk_images_for(slots)
    encode = 1
    while encode < min(chunk, cap, encode_cap or cap) and mm.encode_peak(encode + 1, both) <= ceiling:
        encode += 1
    notes = []
    if mode == "swap":
        notes.append("vision tower and language model take turns on the device (phase-swapped)")
    per_request = mm.kv(mm.prefix_tokens + max_text + max_new)
    top = max(mm.decode_peak(slots, max_text, max_new, both), mm.encode_peak(encode, both))
    return BatchPlan(mode, slots, encode, chunk, top, ceiling, per_request, max_text, max_new, notes)

"""Cards a user may plan for without having one: memory and compute capability of common NVIDIA GPUs.

`cogbatch plan --gpu "RTX 3060 12GB"` answers "will it fit my card?" from any machine. The capability
decides what a run on that card does: dtype `auto` is bf16 from sm80 on, fp16 before, and only bf16
with int4 group 128 on sm80+ gets the fused TinyGemm kernel (`model.quant.plan.describe_int4_kernel`);
everything else expands each int4 weight to a dense copy per call, which the planner counts.

Memory is what `nvidia-smi` reports as the card's total (ECC cards such as the T4, A10, L4 or L40S report
less than their nominal size). The CUDA context, cuBLAS workspaces and the driver's own allocations
live outside PyTorch's allocator and outside the planner's peaks, so a plan assumes
`memory - CONTEXT_RESERVE` usable: ~0.3-0.45 GiB of context with lazy module loading on Ampere and
newer, plus workspaces; 0.5 GiB in all.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from cogbatch.errors import ConfigError

MiB = 2**20
GiB = 2**30
CONTEXT_RESERVE = 512 * MiB


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int  # bytes, as nvidia-smi reports the total
    capability: tuple[int, int]
    nominal_gb: int  # the size the card is sold with (part of its name when there are several)

    @property
    def sm(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


def _gpu(name: str, mib: int, capability: str, nominal_gb: int) -> Gpu:
    major, minor = capability.split(".")
    return Gpu(name, mib * MiB, (int(major), int(minor)), nominal_gb)


GPUS: tuple[Gpu, ...] = (
    _gpu("RTX 2080 Ti", 11264, "7.5", 11),
    _gpu("RTX 3060 12GB", 12288, "8.6", 12),
    _gpu("RTX 3060 Ti", 8192, "8.6", 8),
    _gpu("RTX 3070", 8192, "8.6", 8),
    _gpu("RTX 3080 10GB", 10240, "8.6", 10),
    _gpu("RTX 3080 12GB", 12288, "8.6", 12),
    _gpu("RTX 3090", 24576, "8.6", 24),
    _gpu("RTX 4060", 8188, "8.9", 8),
    _gpu("RTX 4060 Ti 8GB", 8188, "8.9", 8),
    _gpu("RTX 4060 Ti 16GB", 16380, "8.9", 16),
    _gpu("RTX 4070", 12282, "8.9", 12),
    _gpu("RTX 4070 Ti", 12282, "8.9", 12),
    _gpu("RTX 4080", 16376, "8.9", 16),
    _gpu("RTX 4090", 24564, "8.9", 24),
    _gpu("T4", 15360, "7.5", 16),
    _gpu("V100 16GB", 16160, "7.0", 16),
    _gpu("V100 32GB", 32510, "7.0", 32),
    _gpu("A10", 23028, "8.6", 24),
    _gpu("A10G", 23028, "8.6", 24),
    _gpu("L4", 23034, "8.9", 24),
    _gpu("RTX A4000", 16376, "8.6", 16),
    _gpu("RTX A5000", 24564, "8.6", 24),
    _gpu("RTX A6000", 49140, "8.6", 48),
    _gpu("A100 40GB", 40960, "8.0", 40),
    _gpu("A100 80GB", 81920, "8.0", 80),
    _gpu("L40S", 46068, "8.9", 48),
    _gpu("H100 80GB", 81559, "9.0", 80),
)

# Words a card's name is written with (as torch or nvidia-smi print it) that tell no two cards above apart.
_NOISE = re.compile(r"\b(nvidia|geforce|tesla|quadro|sxm\d?|pcie|hbm\d?e?|nvl)\b")


def _compact(text: str) -> str:
    text = _NOISE.sub(" ", text.lower().replace("gib", "gb"))
    return re.sub(r"[^a-z0-9]", "", text)


def _keys(gpu: Gpu) -> set[str]:
    """Every compact spelling that names `gpu`: with or without `rtx`, with or without its memory."""
    model = _compact(re.sub(r"\s\d+GB$", "", gpu.name))
    bare = model.removeprefix("rtx")
    memory = ("", f"{gpu.nominal_gb}gb", f"{gpu.nominal_gb}g")
    return {m + mem for m in (model, bare) for mem in memory}


def find_gpu(query: str) -> Gpu:
    """The card `query` names, spelt loosely ("3060", "rtx3060 12gb", "NVIDIA A100-SXM4-80GB").

    ConfigError (exit 2) for a name matching several cards (the memory tells them apart) or none,
    listing the close matches.
    """
    q = _compact(query)
    found = [g for g in GPUS if q and q in _keys(g)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"--gpu {query!r} matches {', '.join(g.name for g in found)}: name one of them")
    spellings = {k: g for g in GPUS for k in _keys(g)}
    close = difflib.get_close_matches(q, list(spellings), n=12, cutoff=0.6)
    near = list(dict.fromkeys(spellings[k].name for k in close))[:5]
    hint = f"close: {', '.join(near)}" if near else f"known: {', '.join(g.name for g in GPUS)}"
    raise ConfigError(f"--gpu {query!r}: not a card cogbatch knows ({hint}); or give --vram SIZE --capability X.Y")


@dataclass(frozen=True)
class PlanTarget:
    """The device a plan is for when it is not this machine's: a card's memory and capability."""

    name: str
    memory: int
    capability: tuple[int, int] | None  # None: not given (planned as sm80+)
    reserve: int = CONTEXT_RESERVE

    @property
    def usable(self) -> int:
        return self.memory - self.reserve

    def to_dict(self) -> dict[str, object]:
        cc = self.capability
        return {
            "name": self.name,
            "memory_bytes": self.memory,
            "capability": f"{cc[0]}.{cc[1]}" if cc else None,
            "reserve_bytes": self.reserve,
            "usable_bytes": self.usable,
        }


def parse_capability(value: str) -> tuple[int, int]:
    """`8.6` -> (8, 6); ConfigError naming --capability otherwise."""
    m = re.fullmatch(r"\s*(\d{1,2})\.(\d)\s*", str(value))
    if not m:
        raise ConfigError(f"--capability: expected a compute capability such as 8.6 or 7.5, got {value!r}")
    return int(m.group(1)), int(m.group(2))


def plan_target(gpu: str | None, vram: str | int | None, capability: str | None) -> PlanTarget | None:
    """The card of `--gpu`, or of `--vram` (+ `--capability`); None when neither names one."""
    from cogbatch.model.settings import parse_size

    if gpu is not None and (vram is not None or capability is not None):
        raise ConfigError("--gpu names a card with its memory and capability: give --gpu, or --vram and --capability")
    if gpu is not None:
        card = find_gpu(gpu)
        return PlanTarget(card.name, card.memory, card.capability)
    if vram is None:
        if capability is not None:
            raise ConfigError("--capability needs --vram SIZE (the card's memory), or name the card with --gpu")
        return None
    try:
        memory = parse_size(vram)
    except ValueError as e:
        raise ConfigError(f"--vram: {e}") from None
    if memory <= CONTEXT_RESERVE:
        raise ConfigError(f"--vram: {vram} leaves nothing beside the CUDA context ({CONTEXT_RESERVE / GiB:.1f} GiB)")
    cc = parse_capability(capability) if capability is not None else None
    label = f"a {memory / GiB:.2f} GiB card" + (f" (compute capability {cc[0]}.{cc[1]})" if cc else "")
    return PlanTarget(label, memory, cc)

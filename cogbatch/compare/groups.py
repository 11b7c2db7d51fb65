"""Layer groups for `compare --per-layer`, named by the globs a job's `quantization.rules` take.

Each group is quantized alone (the job's settings inside it, the compute dtype elsewhere), so the
group whose quantization moves the answers most is found from data, and the advice is a rule the user
pastes into the job (`{pattern: "*.vision_mlp.*", dtype: int8}`) or gives `cogbatch quantize --rule`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from cogbatch.model.quant.spec import QuantConfig, QuantRule


@dataclass(frozen=True)
class LayerGroup:
    name: str
    patterns: tuple[str, ...]  # module-name globs, as quantization rules write them

    def matches(self, module: str) -> bool:
        return any(fnmatchcase(module, p) for p in self.patterns)


# Every Linear of CogVLM and CogVLM2 is in exactly one group (a test checks both real configs).
LAYER_GROUPS = (
    LayerGroup("vision tower", ("model.vision.*",)),
    LayerGroup("language experts", ("*.language_expert_*", "*.language_mlp.*")),
    LayerGroup("vision experts", ("*.vision_expert_*", "*.vision_mlp.*")),
    LayerGroup("lm_head", ("lm_head",)),
)


def only_group(quant: QuantConfig, group: LayerGroup) -> QuantConfig:
    """The job's quantization inside `group`, none outside it: the other groups' globs first (first match wins)."""
    others = tuple(QuantRule(p, "none") for g in LAYER_GROUPS if g != group for p in g.patterns)
    return dataclasses.replace(quant, rules=others + quant.rules)


def quantized_layers(model_config: Any, quant: QuantConfig | None, group: LayerGroup) -> dict[str, str]:
    """Module name -> dtype label (`int4-g128`, `int8`) of the group's Linears that `quant` quantizes."""
    from cogbatch.model.quant.plan import plan_layers

    out = {}
    for name, lq in plan_layers(model_config, quant).items():
        if group.matches(name):
            out[name] = f"int4-g{lq.group_size}" if lq.qtype == "int4" and lq.group_size else lq.qtype
    return out


def advice(group: LayerGroup, quant: QuantConfig, model_config: Any) -> list[dict[str, str]]:
    """Rules that keep `group` at one step more precision than the job gives it: int4 -> int8, int8 -> none."""
    dtypes = {label.split("-")[0] for label in quantized_layers(model_config, quant, group).values()}
    keep = "int8" if dtypes == {"int4"} else "none"
    return [{"pattern": p, "dtype": keep} for p in group.patterns]

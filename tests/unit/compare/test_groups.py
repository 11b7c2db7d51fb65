"""`--per-layer` groups: every Linear in exactly one, the job's settings inside a group only, the advice."""

from __future__ import annotations

from pathlib import Path

import pytest

from cogbatch.compare.groups import LAYER_GROUPS, advice, only_group, quantized_layers
from cogbatch.model.config import CogVLMConfig
from cogbatch.model.quant.plan import linear_layers, plan_layers
from cogbatch.model.quant.spec import QuantConfig, QuantRule

REAL = Path(__file__).resolve().parents[2] / "data" / "golden" / "real_configs"


@pytest.fixture(scope="module", params=["cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"])
def real_config(request):
    return CogVLMConfig.from_json(REAL / request.param)


def test_every_linear_is_in_exactly_one_group(real_config):
    names = linear_layers(real_config)
    assert len(names) == 577
    for name in names:
        assert [g.name for g in LAYER_GROUPS if g.matches(name)] != [], name
        assert len([g for g in LAYER_GROUPS if g.matches(name)]) == 1, name


def test_only_group_quantizes_that_group_as_the_job_does(real_config):
    job = QuantConfig("int4", 128)
    vision = next(g for g in LAYER_GROUPS if g.name == "vision tower")
    plan = plan_layers(real_config, only_group(job, vision))
    assert plan and all(name.startswith("model.vision.") for name in plan)
    assert set(plan) == {n for n in linear_layers(real_config) if vision.matches(n)}
    assert {lq.qtype for lq in plan.values()} == {"int4"}


def test_the_jobs_own_rules_still_apply_inside_the_group(real_config):
    job = QuantConfig("int4", 128, (QuantRule("lm_head", "none"), QuantRule("*.vision_mlp.*", "int8")))
    experts = next(g for g in LAYER_GROUPS if g.name == "vision experts")
    head = next(g for g in LAYER_GROUPS if g.name == "lm_head")
    labels = quantized_layers(real_config, only_group(job, experts), experts)
    assert {v for k, v in labels.items() if ".vision_mlp." in k} == {"int8"}
    assert {v for k, v in labels.items() if "vision_expert" in k} == {"int4-g128"}
    assert quantized_layers(real_config, job, head) == {}  # the job keeps lm_head: nothing to measure


def test_advice_is_one_step_more_precise(real_config):
    mlp = next(g for g in LAYER_GROUPS if g.name == "vision experts")
    assert advice(mlp, QuantConfig("int4", 64), real_config) == [
        {"pattern": "*.vision_expert_*", "dtype": "int8"},
        {"pattern": "*.vision_mlp.*", "dtype": "int8"},
    ]
    head = next(g for g in LAYER_GROUPS if g.name == "lm_head")
    assert advice(head, QuantConfig("int8"), real_config) == [{"pattern": "lm_head", "dtype": "none"}]

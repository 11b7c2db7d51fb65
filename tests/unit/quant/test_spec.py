"""`cogbatch.model.quant.spec`: one QuantConfig, read from the API's shorthands or a job's `quantization:`."""

from __future__ import annotations

import pytest

from cogbatch.errors import ConfigError
from cogbatch.model.quant.spec import QuantConfig
from tests.unit.quant.helpers import job_with


def test_rules_first_match_wins_and_default_applies():
    q = QuantConfig.parse(
        {
            "default": "int4",
            "group_size": 64,
            "rules": [
                {"pattern": "model.layers.0.*", "dtype": "none"},
                {"pattern": "*.vision_mlp.*", "dtype": "int8"},
                {"pattern": "*.language_mlp.down_proj", "dtype": "int4-g32"},
            ],
        }
    )
    assert q.resolve("model.layers.0.mlp.vision_mlp.up_proj") == ("none", None)  # first match wins
    assert q.resolve("model.layers.1.mlp.vision_mlp.up_proj") == ("int8", None)
    assert q.resolve("model.layers.1.mlp.language_mlp.down_proj") == ("int4", 32)
    assert q.resolve("lm_head") == ("int4", 64)  # the default
    assert q.label() == "int4-g64+rules"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, None),
        ("none", None),
        ("int4", ("int4", 128)),
        ("int4-g32", ("int4", 32)),
        ("INT8", ("int8", 128)),
        ({"default": "none", "rules": [{"pattern": "*", "dtype": "none"}]}, None),
    ],
)
def test_parse_shorthands(spec, expected):
    q = QuantConfig.parse(spec)
    assert (None if q is None else (q.default, q.group_size)) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int3", "quantization"),
        ("int4-g100", "quantization"),
        ({"default": "int4", "colour": 1}, "colour"),
        ({"rules": [{"pattern": "x"}]}, r"rules\[0\]"),
        ({"rules": [{"pattern": "x", "dtype": "fp8"}]}, r"rules\[0\]"),
        ({"group_size": 48}, "group_size"),
        ({"embeddings_on_cpu": "yes"}, "embeddings_on_cpu"),
        ({"kv_cache": "int4"}, "quantization.kv_cache: 'int4' is not one of none, int8"),
        ("int4+kv4", "quantization"),
    ],
)
def test_bad_configs_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.parse(spec)


def test_job_yaml_rules_take_a_group_size_of_their_own(tmp_path):
    spec = {
        "default": "int4",
        "group_size": 128,
        "rules": [
            {"pattern": "*.language_mlp.*", "dtype": "int4", "group_size": 64},
            {"pattern": "lm_head", "dtype": "int4-g32"},
            {"pattern": "*.vision_mlp.*", "dtype": "int8"},
        ],
    }
    settings = job_with(tmp_path, spec).quantization
    assert [r.label() for r in settings.rules] == ["int4-g64", "int4-g32", "int8"]
    assert settings.label() == "int4-g128+rules"
    q = QuantConfig.parse(settings)
    assert q.resolve("model.layers.0.mlp.language_mlp.up_proj") == ("int4", 64)
    assert q.resolve("lm_head") == ("int4", 32)
    assert q.resolve("model.layers.0.self_attn.language_expert_dense") == ("int4", 128)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"pattern": "x", "dtype": "int8", "group_size": 64}, r"rules\[0\]\.group_size: only int4"),
        ({"pattern": "x", "dtype": "int4", "group_size": 48}, r"rules\[0\]\.group_size: must be 32, 64 or 128"),
        ({"pattern": "x", "dtype": "int4-g64", "group_size": 32}, r"rules\[0\]\.group_size: .*agree"),
        ({"pattern": "x", "dtype": "int4-g96"}, r"rules\[0\]\.dtype: group size"),
        ({"pattern": "x", "dtype": "int2"}, r"rules\[0\]\.dtype: must be one of int4, int8, none"),
    ],
)
def test_bad_job_rules_name_the_key(tmp_path, rule, message):
    with pytest.raises(ConfigError, match=message):
        job_with(tmp_path, {"default": "int4", "rules": [rule]})


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "row count"), ("lots", "row count"), (True, "row count"), ({"gpu": 5}, "gpu: unknown key"),
     ({"cpu": -3}, r"dequant_threshold\.cpu")],
)  # fmt: skip
def test_bad_dequant_threshold_names_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        job_with(tmp_path, {"default": "int4", "dequant_threshold": value})


def test_embeddings_on_cpu_is_auto_unless_the_job_says_true_or_false(tmp_path):
    """auto (None) lets the planner decide (host memory for a run that would swap); true / false are kept."""
    assert job_with(tmp_path, {"default": "int4"}).quantization.embeddings_on_cpu is None
    assert job_with(tmp_path, {"default": "int4", "embeddings_on_cpu": "auto"}).quantization.embeddings_on_cpu is None
    assert job_with(tmp_path, {"default": "int4", "embeddings_on_cpu": False}).quantization.embeddings_on_cpu is False
    assert QuantConfig.parse("int4").embeddings_on_cpu is None
    assert QuantConfig.parse({"embeddings_on_cpu": "auto"}).job_dict()["embeddings_on_cpu"] == "auto"
    with pytest.raises(ConfigError, match=r"quantization\.embeddings_on_cpu: must be true, false or auto"):
        job_with(tmp_path, {"default": "int4", "embeddings_on_cpu": "yes"})


def test_kv_cache_is_a_setting_of_its_own_beside_the_weights(tmp_path):
    """An 8-bit KV cache with or without quantized weights; the weights' config ignores it."""
    assert QuantConfig.read("int4+kv8") == QuantConfig(kv_cache="int8")
    assert QuantConfig.read("none+kv8").label() == "none+kv8"
    assert QuantConfig.parse("none+kv8") is None  # no weight to quantize ...
    assert QuantConfig.read({"default": "none", "kv_cache": "int8"}).kv_cache == "int8"  # ... but an int8 cache
    job = job_with(tmp_path, {"default": "none", "kv_cache": "int8"}).quantization
    assert job.kv_cache == "int8" and job.effective() is None and job.job_dict()["kv_cache"] == "int8"
    assert job_with(tmp_path, "int4-g64+kv8").quantization == QuantConfig(group_size=64, kv_cache="int8")
    assert job_with(tmp_path, "int4").quantization.kv_cache == "none"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kv_cache": "int4"}, r"quantization.kv_cache: must be one of none, int8 \(got 'int4'\)"),
        ({"kv_cache": True}, "quantization.kv_cache: must be a non-empty string"),
        ("int8+kv16", r"quantization: must be int4, .* \(each optionally with \+kv8"),
    ],
)
def test_job_kv_cache_mistakes_are_one_line_naming_the_key(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        job_with(tmp_path, spec)

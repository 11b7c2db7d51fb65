"""Reading the official `config.json` of both generations, and refusing look-alikes we would get wrong."""

from __future__ import annotations

import copy
import json

import pytest

from cogbatch.model.config import CogVLMConfig, ConfigError
from tests.golden import golden_root


def real_config(name: str) -> dict:
    return json.loads((golden_root() / "real_configs" / name / "config.json").read_text())


def test_real_configs_give_the_documented_sizes():
    v1 = CogVLMConfig.from_dict(real_config("cogvlm-chat-hf"))
    v2 = CogVLMConfig.from_dict(real_config("cogvlm2-llama3-chat-19B"))
    assert (v1.generation, v1.num_key_value_heads, v1.vision_tokens) == ("cogvlm1", 32, 1227)
    assert v1.image_placeholder_id == v1.pad_token_id == 0
    assert (v2.generation, v2.num_key_value_heads, v2.vision_tokens, v2.qkv_out_features) == ("cogvlm2", 8, 2306, 6144)
    assert v2.eos_token_ids == (128001, 128009) and v2.rope_theta == 500_000.0


def test_cogvlm2_placeholder_is_128002_whatever_the_config_says():
    """The reference hard-codes the CogVLM2 placeholder; a config without pad_token_id still lays out prompts right."""
    d = real_config("cogvlm2-llama3-chat-19B")
    del d["pad_token_id"]
    assert CogVLMConfig.from_dict(d).pad_token_id == 128002
    d["pad_token_id"] = 128001
    assert CogVLMConfig.from_dict(d).image_placeholder_id == 128002


def test_cogvlm2_vocabulary_must_hold_the_placeholder():
    d = real_config("cogvlm2-llama3-chat-19B")
    d["vocab_size"], d["pad_token_id"] = 1000, 0
    with pytest.raises(ConfigError, match="image placeholder id 128002"):
        CogVLMConfig.from_dict(d)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["CogVLMVideoForCausalLM"]}, "architecture CogVLMVideoForCausalLM is not supported"),
        ({"cross_hidden_size": 1024, "cross_image_size": 1120}, "CogAgent-style checkpoints"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"vision_config": {"hidden_act": "quick_gelu"}}, "vision_config.hidden_act 'quick_gelu' is not supported"),
    ],
)
def test_look_alike_checkpoints_are_refused_by_name(change, message):
    d = copy.deepcopy(real_config("cogvlm2-llama3-chat-19B"))
    for key, value in change.items():
        if isinstance(value, dict):
            d[key].update(value)
        else:
            d[key] = value
    with pytest.raises(ConfigError, match=message):
        CogVLMConfig.from_dict(d)


def test_configs_without_architectures_are_accepted():
    d = real_config("cogvlm-chat-hf")
    del d["architectures"]
    assert CogVLMConfig.from_dict(d).generation == "cogvlm1"

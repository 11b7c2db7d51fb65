"""Dry-run options and the shipped model configs (package data)."""

import subprocess
import sys

import pytest

from cogbatch.dryrun.config import TraceConfig, parse_capability, shipped_config, small_config
from cogbatch.model.config import CogVLMConfig


def test_importing_the_package_does_not_import_torch():
    code = "import sys, cogbatch.dryrun; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("name", "hub_name", "generation"),
    [("cogvlm2", "THUDM/cogvlm2-llama3-chat-19B", "cogvlm2"), ("cogvlm", "THUDM/cogvlm-chat-hf", "cogvlm1")],
)
def test_shipped_configs_are_the_real_ones(name, hub_name, generation):
    cfg = CogVLMConfig.from_dict(shipped_config(name))
    assert cfg.generation == generation and cfg.num_hidden_layers == 32 and cfg.hidden_size == 4096
    assert shipped_config(hub_name) == shipped_config(name)
    with pytest.raises(ValueError, match="unknown model"):
        shipped_config("llava")


@pytest.mark.parametrize("name", ["cogvlm2", "cogvlm"])
def test_small_configs_keep_the_structure(name):
    real, small = CogVLMConfig.from_dict(shipped_config(name)), CogVLMConfig.from_dict(small_config(name))
    assert small.generation == real.generation and small.vocab_size == real.vocab_size
    assert (small.num_attention_heads > small.num_key_value_heads) == (
        real.num_attention_heads > real.num_key_value_heads
    )
    assert small.hidden_size % 128 == 0 and small.intermediate_size % 128 == 0


def test_options():
    assert parse_capability("8.6") == (8, 6) and parse_capability("9") == (9, 0)
    with pytest.raises(ValueError, match="capability"):
        parse_capability("sm86")
    assert TraceConfig(quantization="int4-g64", embeddings_on_cpu=True).job_quantization() == {
        "default": "int4",
        "group_size": 64,
        "embeddings_on_cpu": True,
    }
    assert TraceConfig(quantization="none", kv_cache="int8").job_quantization() == {"default": "none",
                                                                                   "kv_cache": "int8"}
    assert TraceConfig(quantization="int4", kv_cache="none").job_quantization() == "int4"
    with pytest.raises(ValueError, match="kv_cache must be one of none, int8"):
        TraceConfig(kv_cache="int4")
    assert TraceConfig(card_bytes=2**30, vram_ceiling=None).ceiling == 2**30
    with pytest.raises(ValueError, match="context"):
        TraceConfig(card_bytes=2**20, context_bytes=2**21)

"""Fixtures of the `cogbatch.model.quant` tests: one small fp16 checkpoint shaped to reach every kernel path."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """fp16 shards; LM rows are multiples of 128 (direct TinyGemm path), the vision tower's 192-wide
    rows give group 64 (dequantize fallback) and 192-row outputs (block-wise TinyGemm repack)."""
    from cogbatch.testing.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("quant_ckpt"),
        arch="cogvlm1",
        hidden_size=256,
        layers=2,
        vision_hidden_size=192,
        vision_layers=1,
        image_size=56,
        dtype="fp16",
        shard_size="1MB",
    )


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"

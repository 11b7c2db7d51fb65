"""Shared test setup: an isolated environment, the golden fixtures, tiny checkpoints, GPU skips.

The environment is set when this file is imported, before any test module imports
huggingface_hub or transformers (they read HF_HOME and the offline flags at import time), so no
test can reach the hub or write to the real home cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.golden import GoldenError, materialize

_SANDBOX = Path(tempfile.mkdtemp(prefix="cogbatch-tests-"))
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(_SANDBOX / "hf_home"),
        "COGBATCH_CACHE_DIR": str(_SANDBOX / "cogbatch_cache"),
    }
)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SANDBOX, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA; torch is imported only when such tests were collected."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The reference fixtures of tests/data/golden, checked against SHA256SUMS and completed in the sandbox.

    A missing or changed fixture fails the run instead of skipping it, so CI cannot pass by testing nothing.
    """
    try:
        return materialize(_SANDBOX / "golden")
    except GoldenError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)  # outside the except: the message alone, no chained traceback


@pytest.fixture(scope="session")
def tiny_cogvlm1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CogVLM checkpoint with the maker's defaults (the golden cogvlm1/dev shapes), fp32."""
    from cogbatch.testing.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cogvlm1"), arch="cogvlm1")


@pytest.fixture(scope="session")
def tiny_cogvlm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, fast CogVLM2 checkpoint (GQA 4/2 heads, 8x8 patch grid), fp32, ~35 MB of weights."""
    from cogbatch.testing.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny_cogvlm2"), arch="cogvlm2", hidden_size=32, heads=4, kv_heads=2, image_size=112
    )

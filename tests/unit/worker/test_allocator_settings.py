"""The worker asks CUDA's allocator for expandable segments unless the user configured the allocator."""

import os

import torch

from cogbatch.worker.placement import prefer_expandable_segments


def test_set_before_cuda_starts(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # restored after the test
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_runtime_setter_once_cuda_has_started(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    assert prefer_expandable_segments()
    assert calls == ["expandable_segments:True"] and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: (_ for _ in ()).throw(AssertionError))
    assert not prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"

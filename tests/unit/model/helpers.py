"""Shared by model-level tests: a plain one-request generation, and a model stuck in a loop."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def plain(model, query, image, cfg):
    """The reference: `generate()` on one request alone."""
    return model.generate(model.collate([model.build_inputs(None, query, image)]), cfg)


@contextmanager
def stuck_on(model, token):
    """The model always prefers `token`: a model stuck in a loop. (monkeypatch would delete a submodule.)"""
    original = model.lm_head
    head = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    head.weight = original.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token] = 1e4
    model.lm_head = head
    try:
        yield
    finally:
        model.lm_head = original

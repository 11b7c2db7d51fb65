"""Load-time parking (`QuantizedLoad.host_prefix`): the vision tower is made for the device and moved to
the host as it is made, in the streaming path and the cache path, and the background cache writer
holds the parked copies, never the device tensors the parking freed.

On CPU parking moves nothing, so `move_module` is replaced by a copy that stands for the move to the
host: every tensor it makes is recorded as "host", everything else counts as the device's.
"""

from __future__ import annotations

import torch
from torch import nn

import cogbatch.model.quant.loader as Q
import cogbatch.model.quant.writeback as W
from tests.unit.quant.helpers import load, logits

PREFIX = "model.vision."


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    return [leaf for n in flatten()[0] for leaf in _leaves(getattr(t, n))]


def _copy(t: torch.Tensor) -> torch.Tensor:
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return t.detach().clone()
    names, meta = flatten()
    return type(t).__tensor_unflatten__({n: _copy(getattr(t, n)) for n in names}, meta, t.size(), t.stride())


class FakeHost:
    """`move_module(module, "cpu")` as a copy of every tensor not already "on the host"."""

    def __init__(self) -> None:
        self.host: set[int] = set()
        self.calls: list[nn.Module] = []

    def on_host(self, t: torch.Tensor) -> bool:
        return all(leaf.data_ptr() in self.host for leaf in _leaves(t))

    def __call__(self, module: nn.Module, device) -> nn.Module:
        assert str(device) == "cpu"
        self.calls.append(module)
        for m in module.modules():
            for slots in (m._parameters, m._buffers):
                for name, t in slots.items():
                    if t is None or t.is_meta or self.on_host(t):
                        continue
                    copy = _copy(t.data if isinstance(t, nn.Parameter) else t)
                    self.host.update(leaf.data_ptr() for leaf in _leaves(copy))
                    slots[name] = nn.Parameter(copy, requires_grad=False) if isinstance(t, nn.Parameter) else copy
        return module


def _parked_load(ckpt, cache_dir, monkeypatch):
    """(model, FakeHost, the tensors the cache writer got) of an int4 load that parks the vision tower."""
    fake = FakeHost()
    written: list = []
    real_load, real_write = Q.load_quantized, W.write_entry
    monkeypatch.setattr(Q, "move_module", fake)
    monkeypatch.setattr(Q, "load_quantized", lambda *a, **kw: real_load(*a, **{**kw, "host_prefix": PREFIX}))

    def write_entry(entry, tensors, *args, **kwargs):
        written.extend(tensors)
        return real_write(entry, tensors, *args, **kwargs)

    monkeypatch.setattr(W, "write_entry", write_entry)
    return load(ckpt, "int4", cache_dir), fake, written


def _check_parked(model: nn.Module, fake: FakeHost) -> None:
    quantized = {n for n, m in model.named_modules() if hasattr(m, "weight_qtype") and m.weight_qtype is not None}
    vision_linears = {n for n in quantized if n.startswith(PREFIX)}
    assert vision_linears and quantized - vision_linears
    names = {id(m): n for n, m in model.named_modules()}
    called = [names[id(m)] for m in fake.calls]
    # each vision Linear parked as it was made (before the whole tower's buffers at the end), nothing else
    assert set(called[:-1]) == vision_linears and called[-1] == PREFIX.rstrip(".")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert fake.on_host(t) == name.startswith(PREFIX), name


def test_streaming_load_parks_the_tower_and_the_writer_holds_host_copies(ckpt, cache_dir, monkeypatch):
    model, fake, written = _parked_load(ckpt, cache_dir, monkeypatch)
    assert model.load_report.cache_status == "written"
    _check_parked(model, fake)
    vision = [(n, t) for n, t in written if n.startswith(PREFIX)]
    assert vision and all(t.data_ptr() in fake.host for _, t in vision)  # no device tensor kept for the write
    assert not any(t.data_ptr() in fake.host for n, t in written if not n.startswith(PREFIX))


def test_cached_load_parks_the_tower(ckpt, cache_dir, monkeypatch):
    first = load(ckpt, "int4", cache_dir)
    model, fake, written = _parked_load(ckpt, cache_dir, monkeypatch)
    assert model.load_report.cache_status == "hit" and not written
    _check_parked(model, fake)
    assert torch.equal(logits(model), logits(first))  # the parked copies are the weights, packing unchanged

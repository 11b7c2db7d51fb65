"""Shared by the tests of `cogbatch.model.quant`: loads, quanto's own reference, the mixed rules most use."""

from __future__ import annotations

from pathlib import Path

import torch
from optimum.quanto import freeze, qint4, qint8, quantize
from optimum.quanto.nn import QModuleMixin
from optimum.quanto.tensor import QTensor
from torch import nn

from cogbatch.job import JobConfig, load_job
from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.config import CogVLMConfig
from cogbatch.model.quant.linear import DequantQLinear
from cogbatch.model.quant.plan import plan_layers
from cogbatch.model.quant.report import _inner_tensors
from cogbatch.model.quant.spec import QuantConfig

MIXED = {
    "default": "int4",
    "rules": [{"pattern": "*.vision_mlp.*", "dtype": "int8"}, {"pattern": "lm_head", "dtype": "none"}],
}


def inputs(cfg: CogVLMConfig, seed: int = 0):
    """A batch with an image (vision experts routed) and a longer text-only row, left-padded."""
    gen = torch.Generator().manual_seed(seed)
    n_vis = cfg.vision_tokens
    ids = torch.randint(3, cfg.vocab_size, (2, n_vis + 12), generator=gen)
    types = torch.zeros_like(ids)
    types[0, 1 : 1 + n_vis] = 1
    ids[0, 1 : 1 + n_vis] = cfg.pad_token_id
    mask = torch.ones_like(ids)
    images = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    return ids, types, mask, images


def logits(model: CogVLM, seed: int = 0) -> torch.Tensor:
    return model.logits(*inputs(model.config, seed))


def load(path, quantization, cache_dir, **kw) -> CogVLM:
    """A quantized CPU load that returns once its cache entry is written (`wait_for_cache`), so that the
    next load of a test finds it; tests of the background write pass `wait_for_cache=False`."""
    kw.setdefault("wait_for_cache", True)
    return CogVLM.from_pretrained(
        path, dtype=kw.pop("dtype", "bfloat16"), device="cpu", quantization=quantization, cache_dir=cache_dir, **kw
    )


def reference(path, spec, dtype="bfloat16", portable=False) -> CogVLM:
    """Load everything in full precision, then quanto's own quantize() + freeze() with our per-module plan.

    `portable`: freeze into quanto's kernel-agnostic layout instead (what `QModuleMixin.qweight`
    computes, with `optimized=False`), the layout quanto serializes.
    """
    model = CogVLM.from_pretrained(path, dtype=dtype, device="cpu")
    for name, lp in plan_layers(model.config, QuantConfig.parse(spec)).items():
        quantize(model, weights=qint4 if lp.qtype == "int4" else qint8, include=[name])
        model.get_submodule(name).weight_group_size = lp.group_size
    if not portable:
        freeze(model)
        return model
    from optimum.quanto.tensor import SymmetricOptimizer, quantize_weight

    for m in model.modules():
        if isinstance(m, QModuleMixin):
            w, qt, g = m.weight, m.weight_qtype, m.weight_group_size
            if isinstance(m.optimizer, SymmetricOptimizer):
                scale, shift = m.optimizer(w, qtype=qt, axis=0), None
            else:
                scale, shift = m.optimizer(w, qtype=qt, axis=0, group_size=g)
            q = quantize_weight(w, qtype=qt, axis=0, scale=scale, shift=shift, group_size=g, optimized=False)
            m.weight = nn.Parameter(q, requires_grad=False)
    return model


def qweights(model: nn.Module) -> dict[str, QTensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, QModuleMixin)}


def flat(t: torch.Tensor) -> list[torch.Tensor]:
    return list(_inner_tensors(t))


def linear_layer(n: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> nn.Linear:
    lin = nn.Linear(k, n, bias=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin.to(dtype)


def quanto_frozen(lin: nn.Linear, qtype, group: int | None = 128, optimized: bool = True) -> DequantQLinear:
    """quanto's own quantization of one layer; `optimized=False`: its portable layout (no kernel repack)."""
    q = DequantQLinear.from_module(lin, weights=qtype)
    q.weight_group_size = group if qtype == qint4 else None
    if optimized:
        q.freeze()
        return q
    from optimum.quanto.tensor import quantize_weight

    w = q.weight
    if qtype == qint4:
        scale, shift = q.optimizer(w, qtype=qtype, axis=0, group_size=group)
    else:
        scale, shift = q.optimizer(w, qtype=qtype, axis=0), None
    q.weight = nn.Parameter(
        quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group, optimized=False),
        requires_grad=False,
    )
    return q


def job_with(tmp_path: Path, quantization) -> JobConfig:
    (tmp_path / "pipeline.yaml").write_text("{}\n")
    job = {"model": "tiny-random:cogvlm2", "input": {"folder": str(tmp_path)}, "output": str(tmp_path / "out"),
           "device": "cpu", "quantization": quantization, "tasks": [{"name": "c", "prompt": "Describe."}]}  # fmt: skip
    return load_job(job, pipeline=tmp_path / "pipeline.yaml")

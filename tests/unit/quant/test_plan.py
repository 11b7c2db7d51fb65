"""`cogbatch.model.quant.plan`: the per-layer plan and the bytes it predicts from names and shapes alone."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from optimum.quanto import freeze, qint4, qint8, quantize
from torch import nn

import cogbatch.model.quant.plan as QPlan
import cogbatch.model.quant.skeleton as skeleton
from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.quant.plan import LayerQuant, linear_layers, plan_layers, predict_weight_bytes
from cogbatch.model.quant.spec import QuantConfig
from tests.golden import golden_root
from tests.unit.quant.helpers import (
    MIXED,
    flat,
    load,
    logits,
)

REAL_CONFIGS = sorted((golden_root() / "real_configs").glob("*/config.json"))


def test_only_linears_are_ever_quantized(golden_dir):
    """A rule matching everything still leaves embeddings, norms and convolutions alone."""
    from accelerate import init_empty_weights

    cfg = CogVLMConfig.from_json(golden_dir / "cogvlm2" / "dev")
    with init_empty_weights():
        model = CogVLM(cfg)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert set(linear_layers(cfg)) == linears
    plan = plan_layers(cfg, QuantConfig.parse({"default": "int4", "rules": [{"pattern": "*", "dtype": "int8"}]}))
    assert set(plan) == linears
    assert not any(("embed" in n or "norm" in n or n.endswith("conv") or "patch_embedding" in n) for n in plan)


def test_group_size_falls_back_to_a_divisor():
    assert QPlan.effective_group_size(4096, 128) == 128
    assert QPlan.effective_group_size(80, 32) == 16  # golden CogVLM2's intermediate size
    assert QPlan.effective_group_size(64, 128) == 64
    assert QPlan.effective_group_size(12, 128) is None  # one group per row


@pytest.mark.parametrize("spec", ["int4", "int8", "int4-g32", MIXED, None])
def test_predicted_bytes_equal_the_loaded_model(ckpt, cache_dir, spec):
    model = load(ckpt, spec, cache_dir)
    predicted = predict_weight_bytes(model.config, QuantConfig.parse(spec), torch.bfloat16)
    r = model.load_report
    assert predicted["total"] == r.total_weight_bytes
    assert {k: predicted[k] for k in ("vision", "language", "embeddings", "lm_head")} == r.component_bytes
    assert predicted["by_dtype"] == r.weight_bytes


def test_embeddings_on_cpu_hooks_keep_the_results(ckpt, cache_dir):
    spec = {"default": "int8", "embeddings_on_cpu": True}
    model = load(ckpt, spec, cache_dir)
    before = logits(model)
    skeleton.offload_embeddings(model, torch.device("cpu"))  # hooks: ids to the table's device, rows back
    assert torch.equal(logits(model), before)
    predicted = predict_weight_bytes(model.config, QuantConfig.parse(spec), torch.bfloat16)
    assert predicted["host"] == predicted["embeddings"] > 0
    assert predicted["device"] == predicted["total"] - predicted["host"]


def test_plan_predicts_bytes_without_importing_quanto(tmp_path):
    """`cogbatch plan` reads config.json only: the planning half of quantization must not pull in quanto."""
    config = next(p for p in REAL_CONFIGS if "cogvlm2" in p.parent.name)
    code = textwrap.dedent(f"""
        import sys
        from cogbatch.job import load_job
        from cogbatch.planning.report import plan_report
        job = {{"model": {str(config.parent)!r}, "input": {{"folder": {str(tmp_path)!r}}}, "device": "cpu",
               "output": {str(tmp_path / "out")!r}, "tasks": [{{"name": "c", "prompt": "Describe."}}]}}
        report = plan_report(load_job(job, pipeline={str(tmp_path / "pipeline.yaml")!r}))
        loaded = sorted(m for m in sys.modules if m.startswith("optimum"))
        assert not loaded, loaded
        assert report.weights["by_dtype"]["int4"] > 0
    """)
    (tmp_path / "pipeline.yaml").write_text("quantization: int4\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def _measured_int4_bytes(shape: tuple[int, int], lp: LayerQuant) -> int:
    """Bytes quanto produces for one Linear of `shape` (random weights), from the frozen tensor's inner tensors."""
    n, k = shape
    linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        linear.weight.normal_(0, k**-0.5)
    parent = nn.Sequential(linear)
    quantize(parent, weights=qint4 if lp.qtype == "int4" else qint8)
    parent[0].weight_group_size = lp.group_size
    freeze(parent)
    return sum(t.numel() * t.element_size() for t in flat(parent[0].weight))


@pytest.mark.slow
@pytest.mark.parametrize("config", REAL_CONFIGS, ids=[p.parent.name for p in REAL_CONFIGS])
def test_predicted_int4_bytes_of_real_configs_match_quanto(config, capsys):
    """One Linear of each distinct shape quantized for real (bf16, int4 g128), extrapolated by count."""
    cfg = CogVLMConfig.from_json(config)
    quant = QuantConfig.parse("int4")
    plan = plan_layers(cfg, quant)
    shapes = linear_layers(cfg)
    counts: dict[tuple, int] = {}
    for name, lp in plan.items():
        counts[(shapes[name], lp)] = counts.get((shapes[name], lp), 0) + 1
    measured = sum(_measured_int4_bytes(shape, lp) * n for (shape, lp), n in counts.items())
    all_shapes = checkpoint_tensor_shapes(cfg)
    biases = sum(math.prod(all_shapes[f"{name}.bias"]) * 2 for name in plan if f"{name}.bias" in all_shapes)
    predicted = predict_weight_bytes(cfg, quant, torch.bfloat16)
    predicted_int4 = predicted["by_dtype"]["int4"]
    with capsys.disabled():
        print(
            f"\n{config.parent.name}: {len(counts)} distinct Linear shapes; int4 predicted "
            f"{predicted_int4 / 2**30:.3f} GiB, measured {measured / 2**30:.3f} GiB "
            f"(+{biases / 2**20:.1f} MiB bf16 biases); all weights predicted {predicted['total'] / 2**30:.3f} GiB "
            f"= {', '.join(f'{k} {v / 2**30:.3f}' for k, v in predicted.items() if isinstance(v, int))} GiB"
        )
    assert abs(predicted_int4 - measured) / measured < 0.05

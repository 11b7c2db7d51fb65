"""fp16 compute for pre-Ampere GPUs: which dtype `auto` picks, and whether fp16 activations stay in range.

CogVLM2 was trained in bf16 (fp32's range); fp16 tops out at 65504 and its squares at |x| > 256, while
real CogVLM2 residual streams reach 1e4+. Every decoder layer, vision layer, MLP, GLU, norm and
attention block of both golden checkpoints is hooked and compared in fp16 against fp32, once as they
are and once with weights scaled until the activations reach real magnitudes. What has to stay in
fp32 does: RMSNorm upcasts itself, torch's LayerNorm keeps its statistics in fp32 for fp16 inputs
(CPU and CUDA), and `scaled_dot_product_attention` computes its softmax in fp32.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cogbatch.model.cogvlm as cogvlm
from cogbatch.model.cogvlm import CogVLM, resolve_dtype
from cogbatch.model.language import DecoderLayer, ExpertMLP, RMSNorm, VisionExpertAttention
from cogbatch.model.vision import GLU, MLP, Attention, TransformerLayer

HOOKED = (DecoderLayer, VisionExpertAttention, ExpertMLP, RMSNorm, TransformerLayer, Attention, MLP, GLU, nn.LayerNorm)
TARGET = 2e4  # max |activation| the stress variant scales to: 1e4+ as in CogVLM2, below fp16's 65504
FP16_MAX = torch.finfo(torch.float16).max


# --------------------------------------------------------------------------------------------
# dtype: auto


@pytest.mark.parametrize(
    ("capability", "expected", "kernel"),
    [
        ((7, 5), torch.float16, "no fused int4 kernel"),  # RTX 2080 Ti / T4
        ((6, 1), torch.float16, "no fused int4 kernel"),  # GTX 1080 Ti
        ((8, 0), torch.bfloat16, "TinyGemm"),  # A100
        ((8, 9), torch.bfloat16, "TinyGemm"),  # RTX 4090
    ],
)
def test_auto_dtype_follows_compute_capability(tmp_path, monkeypatch, caplog, capability, expected, kernel):
    """bf16 only from sm80: `torch.cuda.is_bf16_supported()` is True on sm75/sm61 too (emulated bf16)."""
    from cogbatch.job import load_job

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cogvlm, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="cogbatch.model"):
        assert resolve_dtype("auto", torch.device("cuda")) == expected
    name = str(expected).removeprefix("torch.")
    line = next(r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage())
    assert f"compute capability {capability[0]}.{capability[1]}" in line and name in line and kernel in line
    assert resolve_dtype("fp32", torch.device("cuda")) == torch.float32  # an explicit dtype is kept

    (tmp_path / "pipeline.yaml").write_text("device: auto\ndtype: auto\n")
    job = {"model": "tiny-random:cogvlm2", "input": {"folder": str(tmp_path)}, "output": str(tmp_path / "out"),
           "tasks": [{"name": "caption", "prompt": "Describe the image."}]}  # fmt: skip
    for quantization in ("none", "int4"):
        cfg = load_job({**job, "quantization": quantization}, pipeline=tmp_path / "pipeline.yaml")
        assert cfg.source.compute_dtype() == name  # what enters the fingerprint


def test_auto_dtype_on_cpu_is_unchanged():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


# --------------------------------------------------------------------------------------------
# activations: fp16 against fp32 on the golden checkpoints


def _activations(model: CogVLM, c: dict) -> dict[str, torch.Tensor]:
    """Output of every hooked module (and of every Linear, for the stress calibration) for golden case `a`."""
    out: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, args, result: out.__setitem__(name, result.detach().float())

    handles = [
        m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, (*HOOKED, nn.Linear))
    ]
    try:
        out["logits"] = model.logits(c["a_input_ids"], c["a_token_type_ids"], c["a_attention_mask"], c["a_images"])
    finally:
        for h in handles:
            h.remove()
    return out


def _errors(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative L2 error per activation (inf where `other` is not finite)."""
    return {
        n: float((other[n] - r).norm() / r.norm()) if torch.isfinite(other[n]).all() else float("inf")
        for n, r in ref.items()
    }


def _hooked_names(model: CogVLM) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, HOOKED)] + ["logits"]


def _golden(golden_dir, gen: str) -> tuple[CogVLM, dict]:
    path = golden_dir / gen / "dev"
    return CogVLM.from_pretrained(path, dtype="float32", device="cpu"), load_file(path / "cases.safetensors")


def _in(model: CogVLM, dtype: torch.dtype) -> CogVLM:
    return copy.deepcopy(model).to(dtype)


def _report(label: str, model: CogVLM, ref: dict, errs16: dict, errs_bf16: dict) -> str:
    names = _hooked_names(model)
    worst = max(names, key=lambda n: errs16[n])
    peak = max(names, key=lambda n: ref[n].abs().max())
    return (
        f"{label}: max |activation| {float(ref[peak].abs().max()):.3g} ({peak}); fp16 rel err max "
        f"{errs16[worst]:.2e} ({worst}), median {sorted(errs16[n] for n in names)[len(names) // 2]:.2e}; "
        f"bf16 max {max(errs_bf16[n] for n in names):.2e}"
    )


@pytest.mark.parametrize("gen", ["cogvlm1", "cogvlm2"])
def test_fp16_activations_match_fp32_on_golden_checkpoints(golden_dir, gen, capsys):
    fp32, c = _golden(golden_dir, gen)
    ref = _activations(fp32, c)
    errs16 = _errors(ref, _activations(_in(fp32, torch.float16), c))
    errs_bf16 = _errors(ref, _activations(_in(fp32, torch.bfloat16), c))
    with capsys.disabled():
        print("\n" + _report(f"{gen} fp16 vs fp32", fp32, ref, errs16, errs_bf16))
    for name in _hooked_names(fp32):
        assert errs16[name] < 5e-3, name  # finite, and ~8x closer to fp32 than bf16 is
        assert errs16[name] <= errs_bf16[name], name


def _qk_rows(model: CogVLM, name: str) -> slice:
    """Rows of a fused QKV weight that produce q and k (scaling them scales attention scores, not values)."""
    cfg = model.config
    if name.startswith("model.vision."):
        return slice(0, 2 * cfg.vision.hidden_size)
    return slice(0, (cfg.num_attention_heads + cfg.num_key_value_heads) * cfg.head_dim)


def _max_score(model: CogVLM, acts: dict[str, torch.Tensor]) -> float:
    """Largest |q.k| / sqrt(hd) of any attention, from the QKV outputs (GQA: kv head j with query head j)."""
    cfg = model.config
    best = 0.0
    for name, t in acts.items():
        if not name.endswith("query_key_value"):
            continue
        if name.startswith("model.vision."):
            h = hkv = cfg.vision.num_heads
            hd = cfg.vision.hidden_size // h
        else:
            h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = t[..., : hkv * hd].unflatten(-1, (hkv, hd)).transpose(-2, -3)  # (B, Hkv, L, hd)
        k = t[..., h * hd : (h + hkv) * hd].unflatten(-1, (hkv, hd)).transpose(-2, -3)
        best = max(best, float((q @ k.transpose(-1, -2)).abs().max()) / hd**0.5)
    return best


@torch.no_grad()
def _stressed(model: CogVLM, c: dict, scores: float | None) -> CogVLM:
    """A copy whose norm inputs reach TARGET: vision attention/MLP outputs (LayerNorm inputs), the GLU's
    projection (norm1's input) and the LM residual stream (RMSNorm inputs, through layer 0's MLPs),
    like CogVLM2's massive activations; with `scores`, q and k scaled until attention scores reach it."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for _ in range(3):  # each scale changes what the later modules see: iterate to the targets
        acts = _activations(model, c)
        for name, m in modules.items():
            if name.startswith("model.vision.") and name.endswith(("attention.dense", "mlp.fc2")):
                s = TARGET / float(acts[name].abs().max())
                m.weight.mul_(s)
                m.bias.mul_(s)
            elif name == "model.vision.linear_proj.linear_proj":
                m.weight.mul_(TARGET / float(acts[name].abs().max()))
            elif name.startswith("model.layers.0.mlp.") and name.endswith("down_proj"):
                m.weight.mul_(TARGET / float(acts["model.layers.0"].abs().max()))
        if scores is not None:
            s = (scores / _max_score(model, _activations(model, c))) ** 0.5
            for name, m in modules.items():
                if name.endswith("query_key_value"):
                    m.weight[_qk_rows(model, name)] *= s
    return model


def _norm_inputs(model: CogVLM, acts: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |input| of the norms: the LM residual stream, the vision sub-layer outputs, the GLU projection."""
    vision = [n for n in acts if n.startswith("model.vision.transformer.") and n.endswith((".attention", ".mlp"))]
    return {
        "rmsnorm": max(float(acts[f"model.layers.{i}"].abs().max()) for i in range(model.config.num_hidden_layers)),
        "layernorm": max(float(acts[n].abs().max()) for n in vision),
        "glu norm1": float(acts["model.vision.linear_proj.linear_proj"].abs().max()),
    }


@pytest.mark.parametrize("gen", ["cogvlm1", "cogvlm2"])
def test_fp16_activations_stay_finite_and_close_at_real_magnitudes(golden_dir, gen, capsys):
    """Norm inputs at 2e4: an fp16 variance would overflow (|x| > 256); fp16 stays within 1e-2 of fp32."""
    fp32, c = _golden(golden_dir, gen)
    model = _stressed(fp32, c, scores=None)
    ref = _activations(model, c)
    peaks = _norm_inputs(model, ref)
    assert min(peaks.values()) > 1e4 and max(peaks.values()) < FP16_MAX / 2
    errs16 = _errors(ref, _activations(_in(model, torch.float16), c))
    errs_bf16 = _errors(ref, _activations(_in(model, torch.bfloat16), c))
    with capsys.disabled():
        print("\n" + _report(f"{gen} stressed (norm inputs {peaks})", model, ref, errs16, errs_bf16))
    for name in _hooked_names(model):
        assert errs16[name] < 1e-2, name
        assert errs16[name] <= errs_bf16[name], name


@pytest.mark.parametrize("gen", ["cogvlm1", "cogvlm2"])
def test_fp16_softmax_survives_scores_beyond_the_fp16_range(golden_dir, gen):
    """Attention scores of 1e5 (> 65504): SDPA's fp32 softmax keeps every fp16 output finite.

    Scores that large make attention itself ill-conditioned (a 1e-3 error in q moves a score by
    100), so closeness is judged against bf16, the dtype the model is meant to run in.
    """
    fp32, c = _golden(golden_dir, gen)
    model = _stressed(fp32, c, scores=1e5)
    ref = _activations(model, c)
    assert _max_score(model, ref) > FP16_MAX
    errs16 = _errors(ref, _activations(_in(model, torch.float16), c))
    errs_bf16 = _errors(ref, _activations(_in(model, torch.bfloat16), c))
    for name in _hooked_names(model):
        assert errs16[name] < float("inf"), name
        assert errs16[name] <= max(errs_bf16[name], 1e-2), name


def test_the_stress_check_catches_fp16_norm_statistics(golden_dir, monkeypatch):
    """Negative control: an RMSNorm whose variance is computed in fp16 fails the stressed comparison."""
    fp32, c = _golden(golden_dir, "cogvlm2")
    model = _stressed(fp32, c, scores=None)
    ref = _activations(model, c)

    def fp16_statistics(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    monkeypatch.setattr(RMSNorm, "forward", fp16_statistics)
    errs16 = _errors(ref, _activations(_in(model, torch.float16), c))
    assert errs16["model.layers.1.input_layernorm"] > 0.5  # x^2 overflows: the norm outputs ~0 (or NaN)

"""The reference parity checks on a CUDA device (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.prompts import BatchInputs
from cogbatch.model.settings import GenerationConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls would cost ~1e-3 relative error: the parity thresholds assume true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("gen", ["cogvlm1", "cogvlm2"])
def test_logits_and_greedy_tokens_on_cuda(gen, golden_dir):
    model = CogVLM.from_pretrained(golden_dir / gen / "dev", dtype="float32", device="cuda")
    c = load_file(golden_dir / gen / "dev" / "cases.safetensors")
    logits = model.logits(c["a_input_ids"], c["a_token_type_ids"], c["a_attention_mask"], c["a_images"]).cpu()
    assert float((logits - c["a_logits"]).abs().max() / c["a_logits"].abs().max()) <= 1e-4
    batch = BatchInputs(c["cL_input_ids"], c["cL_token_type_ids"], c["cL_attention_mask"], c["cL_images"])
    out = model.generate(batch, GenerationConfig(max_new_tokens=8, stop_token_ids=()))
    assert out.token_ids == c["cL_new_tokens"].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_runs(dtype, golden_dir):
    model = CogVLM.from_pretrained(golden_dir / "cogvlm2" / "dev", dtype=dtype, device="cuda")
    c = load_file(golden_dir / "cogvlm2" / "dev" / "cases.safetensors")
    batch = BatchInputs(c["cL_input_ids"], c["cL_token_type_ids"], c["cL_attention_mask"], c["cL_images"])
    out = model.generate(batch, GenerationConfig(max_new_tokens=8))
    assert len(out.token_ids) == 3 and all(r in ("eos", "length") for r in out.finish_reasons)
    logits = model.logits(c["a_input_ids"], c["a_token_type_ids"], c["a_attention_mask"], c["a_images"])
    assert torch.isfinite(logits).all()

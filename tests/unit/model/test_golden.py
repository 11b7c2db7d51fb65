"""Parity with the official reference implementation, on the tiny checkpoints of `tests/data/golden/`.

Every tensor here was computed by the reference code (see tests/data/golden/README.md). Thresholds are the
README's: logits within 1e-4 of their largest magnitude, vision / hidden tensors within 1e-4
absolute, token ids, positions and layouts exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
from cogbatch.model.language import build_position_ids
from cogbatch.model.preprocess import preprocess_image
from cogbatch.model.prompts import BatchInputs
from cogbatch.model.settings import GenerationConfig
from tests.golden import golden_configs, golden_root

CONFIGS = golden_configs()
IDS = [f"{p.parent.name}/{p.name}" for p in CONFIGS]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=CONFIGS or [None], ids=IDS or ["missing"])
def golden(request, golden_dir):
    if request.param is None:
        pytest.fail(f"no golden checkpoints with cases.safetensors under {golden_dir}")
    torch.manual_seed(0)
    path = golden_dir / request.param.relative_to(golden_root())  # the copy with its weights and rows restored
    model = CogVLM.from_pretrained(path, dtype="float32", device="cpu")
    return model, load_file(path / "cases.safetensors")


def test_config_and_names_match_checkpoint(golden):
    model, _ = golden
    expected = {n: s for n, s in checkpoint_tensor_shapes(model.config).items() if not n.endswith("inv_freq")}
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == expected


def test_vision_tower_stages(golden):
    model, c = golden
    stages = model.model.vision.stages(c["d_images"])
    for name in ("patch_embedding_out", "vit_out", "glu_in", "vision_out"):
        assert stages[name].shape == c[f"d_{name}"].shape, name
        torch.testing.assert_close(stages[name], c[f"d_{name}"], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("case", ["a", "t", "cR", "cL"])
def test_position_ids_follow_reference_rule(golden, case):
    _, c = golden
    pos = build_position_ids(c[f"{case}_token_type_ids"], c[f"{case}_attention_mask"])
    assert torch.equal(pos, c[f"{case}_position_ids"])


def test_inputs_embeds_and_hidden_states(golden):
    model, c = golden
    feats = model.encode_images(c["a_images"])
    embeds = model.model.embed(c["a_input_ids"], c["a_token_type_ids"], feats)
    torch.testing.assert_close(embeds, c["a_inputs_embeds"], atol=1e-4, rtol=0)
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in model.model.layers[:-1]]
    try:
        final = model.model(embeds, c["a_token_type_ids"], c["a_position_ids"], c["a_attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    ours = torch.cat([embeds, *outputs, final])  # reference output_hidden_states layout
    torch.testing.assert_close(ours, c["a_hidden_states"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["a", "t"])
def test_full_logits_with_and_without_image(golden, case):
    model, c = golden
    logits = model.logits(c[f"{case}_input_ids"], c[f"{case}_token_type_ids"], c[f"{case}_attention_mask"],
                          c.get(f"{case}_images"))  # fmt: skip
    assert logits.shape == c[f"{case}_logits"].shape
    assert rel_err(logits, c[f"{case}_logits"]) <= 1e-4


def test_right_padded_batch_real_tokens(golden):
    """The official demo's right padding: logits at each sample's last real token are still right."""
    model, c = golden
    logits = model.logits(c["cR_input_ids"], c["cR_token_type_ids"], c["cR_attention_mask"], c["cR_images"])
    last = logits[torch.arange(3), c["cR_last_real_index"]]
    assert rel_err(last, c["cR_logits_last_real_token"]) <= 1e-4
    assert rel_err(last, c["c_solo_logits_last_token"]) <= 1e-4


def test_left_padded_batch_logits(golden):
    model, c = golden
    logits = model.logits(c["cL_input_ids"], c["cL_token_type_ids"], c["cL_attention_mask"], c["cL_images"])
    assert rel_err(logits[:, -1], c["cL_logits_last_position"]) <= 1e-4
    # The reference's own positions (bos at 1 under left padding) give the same answer.
    ref_pos = model.logits(c["cL_input_ids"], c["cL_token_type_ids"], c["cL_attention_mask"], c["cL_images"],
                           position_ids=c["cL_position_ids"])  # fmt: skip
    assert rel_err(ref_pos[:, -1], c["cL_logits_last_position"]) <= 1e-4


def _greedy(model, c, case, n=8):
    batch = BatchInputs(c[f"{case}_input_ids"], c[f"{case}_token_type_ids"], c[f"{case}_attention_mask"],
                        c[f"{case}_images"])  # fmt: skip
    return model.generate(batch, GenerationConfig(max_new_tokens=n, stop_token_ids=()), return_logits=True)


def test_greedy_continuation_with_kv_cache(golden):
    model, c = golden
    out = _greedy(model, c, "a")
    assert out.token_ids[0] == c["b_new_tokens"][0].tolist()
    assert out.finish_reasons == ["length"]
    assert rel_err(out.step_logits[0], c["b_step_logits"]) <= 1e-4


def test_left_padded_batch_generation(golden):
    model, c = golden
    out = _greedy(model, c, "cL")
    assert out.token_ids == c["cL_new_tokens"].tolist()
    steps = torch.stack(out.step_logits, dim=1)  # (steps, B, V)
    top = steps.topk(16, dim=-1)
    assert torch.equal(top.indices, c["cL_step_logits_top16_indices"])
    assert rel_err(top.values, c["cL_step_logits_top16_values"]) <= 1e-4
    # Left padding is how a correct batched captioner works: sample 0 equals its solo run.
    assert out.token_ids[0] == c["b_new_tokens"][0].tolist()


def test_preprocessing_is_bit_exact(golden_dir):
    for gen in ("cogvlm1", "cogvlm2"):
        ref = load_file(golden_dir / "images" / f"preprocess_golden_{gen}.safetensors")
        for key, expected in ref.items():
            if not key.startswith(("img_a_S", "img_b_S")):
                continue
            name = "img_a_rgb_150x97.png" if key.startswith("img_a") else "img_b_rgba_48x64.png"
            size = int(key.rsplit("_S", 1)[1])
            ours = preprocess_image(Image.open(golden_dir / "images" / name), size)
            assert torch.equal(ours, expected), key


@pytest.mark.parametrize("gen", ["cogvlm1", "cogvlm2"])
def test_prompt_layouts_match_reference(gen, golden_dir):
    spec = json.loads((golden_dir / f"templates_{gen}.json").read_text())
    model = CogVLM.from_pretrained(golden_dir / spec["config"], dtype="float32", device="cpu")
    image = torch.zeros(3, spec["image_size"], spec["image_size"])
    assert model.config.image_placeholder_id == spec["vision_placeholder_id"]
    for case in spec["cases"]:
        sample = model.build_inputs(None, case["query"], image if case["with_image"] else None,
                                    case["template_version"], [tuple(h) for h in case["history"]])  # fmt: skip
        assert sample.prompt == case["prompt_text"]
        assert sample.input_ids == case["input_ids"], case["prompt_text"]
        assert sample.token_type_ids == case["token_type_ids"]


@pytest.mark.parametrize("name", ["cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"])
def test_real_checkpoint_names_and_shapes(name):
    """Our tensor list for the real configs equals the real checkpoints' names and shapes, in order."""
    real = golden_root() / "real_configs" / name
    ours = checkpoint_tensor_shapes(CogVLMConfig.from_json(real))
    ref = json.loads((real / "param_shapes.json").read_text())["shapes"]
    assert list(ours) == list(ref)
    assert ours == {k: tuple(v) for k, v in ref.items()}


def test_golden_dir_has_both_generations():
    gens = {Path(p).parent.name for p in CONFIGS}
    assert gens == {"cogvlm1", "cogvlm2"}

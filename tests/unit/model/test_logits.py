"""`CogVLM.logits` scoring a continuation: `last` positions only, image features given, and teacher forcing
of a greedy answer giving back the logits its generation saw (what `cogbatch compare` relies on)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.language import LANGUAGE
from cogbatch.model.settings import GenerationConfig


@pytest.fixture(scope="module", params=["cogvlm1", "cogvlm2"])
def model(request, golden_dir):
    return CogVLM.from_pretrained(golden_dir / request.param / "dev", dtype="float32", device="cpu")


def _sample(model, golden_dir):
    image = Image.open(golden_dir / "images" / "img_a_rgb_150x97.png")
    return model.build_inputs(None, "Describe this image.", image, "chat")


def test_last_and_image_features_equal_the_full_pass(model, golden_dir):
    batch = model.collate([_sample(model, golden_dir)])
    full = model.logits(batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.images)
    feats = model.encode_images(batch.images)
    tail = model.logits(batch.input_ids, batch.token_type_ids, batch.attention_mask, image_features=feats, last=3)
    assert tail.shape == (1, 3, full.shape[-1])
    torch.testing.assert_close(tail, full[:, -3:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last must be"):
        model.logits(batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.images, last=0)


def test_forcing_a_greedy_answer_gives_back_the_logits_it_was_generated_with(model, golden_dir):
    sample = _sample(model, golden_dir)
    out = model.generate(model.collate([sample]), GenerationConfig(max_new_tokens=6, stop_token_ids=()),
                         return_logits=True)  # fmt: skip
    tokens = out.token_ids[0]
    ids = torch.tensor([sample.input_ids + tokens[:-1]])
    types = torch.tensor([sample.token_type_ids + [LANGUAGE] * (len(tokens) - 1)])
    forced = model.logits(ids, types, torch.ones_like(ids), sample.image[None], last=len(tokens))[0]
    assert forced.argmax(-1).tolist() == tokens
    torch.testing.assert_close(forced, out.step_logits[0].float(), rtol=1e-4, atol=1e-4)

"""From nothing to a caption: make a tiny checkpoint with the script, load it, caption an image."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from cogbatch.model.cogvlm import CogVLM
from cogbatch.model.settings import GenerationConfig
from tests.golden import REPO


def test_script_checkpoint_loads_and_captions(tmp_path, golden_dir):
    out = tmp_path / "ckpt"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), "--out", str(out), "--arch", "cogvlm2",
         "--hidden-size", "32", "--layers", "2", "--image-size", "56", "--shard-size", "4MB", "--seed", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # really sharded

    model = CogVLM.from_pretrained(out, dtype="float32", device="cpu")
    image = Image.open(golden_dir / "images" / "img_a_rgb_150x97.png")
    samples = [model.build_inputs(None, q, image) for q in ("Describe this image.", "What colors are there?")]
    result = model.generate(model.collate(samples), GenerationConfig(max_new_tokens=6, stop_token_ids=()))
    assert [len(ids) for ids in result.token_ids] == [6, 6]
    assert all(isinstance(t, str) for t in result.texts)
    assert result.finish_reasons == ["length", "length"]

"""`cogbatch.load(...).generate(...)`: the pipeline's answers from Python, without a job file or an output."""

from __future__ import annotations

import pytest
from PIL import Image

import cogbatch
from cogbatch.errors import ConfigError, DoesNotFit
from cogbatch.store import read_results
from tests.e2e.conftest import make_images

PROMPT = "Describe this image."
SETTINGS = {"quantization": "none", "device": "cpu", "dtype": "fp32", "batch_size": 2}


@pytest.fixture(scope="module")
def vlm(tiny_cogvlm2):
    return cogbatch.load(str(tiny_cogvlm2), max_new_tokens=6, **SETTINGS)


def _pipeline_texts(tmp_path, model_dir, folder, prompts):
    job = {"model": str(model_dir), "input": {"folder": str(folder)}, "output": str(tmp_path / "out"),
           "generation": {"max_new_tokens": 6}, **SETTINGS,
           "tasks": [{"name": name, "prompt": p} for name, p in prompts.items()]}  # fmt: skip
    summary = cogbatch.run_job(job, quiet=True)
    assert summary.exit_code == 0
    rows = read_results(tmp_path / "out").to_pylist()
    return {(r["path"].rpartition("/")[2], r["task"]): r for r in rows}


@pytest.mark.parametrize("arch", ["tiny_cogvlm2", "tiny_cogvlm1"])
def test_greedy_answers_are_the_pipelines(tmp_path, arch, request):
    """Paths and PIL images alike, over several chunks (batch_size 2, 9 images): the rows `run_job` writes."""
    model_dir = request.getfixturevalue(arch)
    paths = make_images(tmp_path / "images", 9)
    rows = _pipeline_texts(tmp_path, model_dir, tmp_path / "images", {"caption": PROMPT})
    vlm = cogbatch.load(str(model_dir), max_new_tokens=6, **SETTINGS)
    assert vlm.plan.chunk_images < len(paths)  # the call runs more than one chunk
    by_path = vlm.generate(paths, PROMPT)
    by_image = vlm.generate([Image.open(p) for p in paths], PROMPT)
    for path, a, b in zip(paths, by_path, by_image, strict=True):
        row = rows[path.name, "caption"]
        assert a.ok and a.text == b.text == row["text"]
        keys = ("finish_reason", "tokens_in", "tokens_out", "width", "height")
        assert [getattr(a, k) for k in keys] == [row[k] for k in keys]


def test_greedy_answers_are_model_generate(vlm, tmp_path):
    """In fp32 the worker's continuous batches give what the model's own generate gives, image by image."""
    from cogbatch.model.settings import GenerationConfig

    images = [Image.open(p) for p in make_images(tmp_path, 3)]
    answers = vlm.generate(images, PROMPT)
    model = vlm.model
    for image, answer in zip(images, answers, strict=True):
        sample = model.build_inputs(None, PROMPT, image=image.convert("RGB"), template="chat")
        out = model.generate(model.collate([sample]), GenerationConfig(max_new_tokens=6, stop_on_repetition=True))
        assert answer.text == out.texts[0].strip() and answer.finish_reason == out.finish_reasons[0]


def test_prompts_per_image_and_several_tasks(vlm, tmp_path):
    images = [Image.open(p) for p in make_images(tmp_path, 3)]
    prompts = ["What is this?", "Describe {this} image.", PROMPT]  # braces are literal text
    per_image = vlm.generate(images, prompts)
    assert [a.prompt for a in per_image] == prompts
    alone = [vlm.generate([img], p)[0] for img, p in zip(images, prompts, strict=True)]
    assert [a.text for a in per_image] == [a.text for a in alone]
    assert len({a.tokens_in for a in per_image}) > 1  # the prompts did differ
    tasks = vlm.generate(images, {"what": prompts[0], "describe": PROMPT}, max_new_tokens=3)
    assert [sorted(d) for d in tasks] == [["describe", "what"]] * 3
    first = vlm.generate(images, prompts[0], max_new_tokens=3)
    assert [d["what"].text for d in tasks] == [a.text for a in first]
    assert all(d["describe"].tokens_out <= 3 for d in tasks)
    assert vlm.plan.max_new == 3  # the plan follows the call's max_new_tokens
    assert vlm.generate([], PROMPT) == []


def test_a_bad_image_is_an_error_answer_and_the_others_are_answered(vlm, tmp_path):
    good = make_images(tmp_path, 2)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    answers = vlm.generate([good[0], tmp_path / "missing.png", broken, str(good[1])], PROMPT)
    assert [a.error for a in answers] == [None, "file not found", "not an image", None]
    assert answers[1].text is None and not answers[1].ok
    assert [a.text for a in (answers[0], answers[3])] == [a.text for a in vlm.generate(good, PROMPT)]


def test_alpha_and_orientation_as_the_pipeline_decodes_them(vlm, tmp_path):
    """A PIL image gets what its file would: transparency on white, not on the black its pixels store
    (black and white images get different texts from this model)."""
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    white = Image.new("RGB", (40, 30), "white")
    texts = [a.text for a in vlm.generate([rgba, tmp_path / "clear.png", white], PROMPT)]
    assert texts[0] == texts[1] == texts[2]
    assert vlm.generate([Image.new("RGB", (40, 30), "black")], PROMPT)[0].text != texts[2]


def test_nothing_is_written_but_the_weights_cache(vlm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "in", 2)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    vlm.generate(sorted((tmp_path / "in").iterdir()), PROMPT)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_plan_is_inspectable(vlm):
    plan = vlm.plan
    assert plan.mode == "resident" and plan.slots == 2  # batch_size 2 on the CPU
    assert 0 < plan.peak_bytes <= plan.ceiling == 11 * 2**30
    assert "resident, 2 slots" in repr(vlm)


def test_wrong_arguments_raise_one_clear_error(vlm, tiny_cogvlm2):
    img = Image.new("RGB", (32, 32))
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) max_tokens"):
        vlm.generate([img], PROMPT, max_tokens=5)
    with pytest.raises(TypeError, match=r"a list of PIL images or paths \(one image: \[image\]\)"):
        vlm.generate("a.jpg", PROMPT)
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL image or a path, got int"):
        vlm.generate([img, 3], PROMPT)
    with pytest.raises(ConfigError, match="2 prompts for 1 images"):
        vlm.generate([img], ["a", "b"])
    with pytest.raises(ConfigError, match=r"prompt\[1\]: must be a non-empty string"):
        vlm.generate([img, img], ["a", " "])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        vlm.generate([img], PROMPT, max_new_tokens=0)
    with pytest.raises(ConfigError, match="template"):
        vlm.generate([img], PROMPT, template="poem")
    with pytest.raises(TypeError, match="prompt must be a str"):
        vlm.generate([img], 42)
    model = str(tiny_cogvlm2)
    with pytest.raises(ConfigError, match="vram_ceiling: must be a size"):
        cogbatch.load(model, vram_ceiling="lots", device="cpu")
    with pytest.raises(ConfigError, match="quantization"):
        cogbatch.load(model, quantization="int3", device="cpu")
    with pytest.raises(TypeError, match=r"load\(\) got unknown keyword"):
        cogbatch.load(model, device="cpu", temprature=0.5)
    with pytest.raises(DoesNotFit, match="ceiling"):
        cogbatch.load(model, vram_ceiling="1MiB", **SETTINGS)


def test_cuda_without_a_gpu_is_a_config_error(tiny_cogvlm2):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ConfigError, match="device: cuda"):
        cogbatch.load(str(tiny_cogvlm2), device="cuda")


def test_a_call_that_cannot_fit_raises_before_any_work_and_the_next_one_runs(tiny_cogvlm2):
    vlm = cogbatch.load(str(tiny_cogvlm2), vram_ceiling="0.7GiB", max_new_tokens=6, **SETTINGS)
    img = Image.new("RGB", (32, 32))
    with pytest.raises(DoesNotFit, match=r"ceiling is 0\.70 GiB"):
        vlm.generate([img], PROMPT, max_new_tokens=10**6)
    assert vlm.plan.max_new == 6 and vlm.generate([img], PROMPT)[0].ok

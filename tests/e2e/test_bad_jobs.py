"""Malformed job files stop before any work with exit code 2 and a message naming the key."""

from __future__ import annotations

import pytest
import yaml

from tests.e2e.conftest import cogbatch_cmd


def _job(tmp_path, text: str):
    (tmp_path / "images").mkdir(exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


BASE = {
    "model": "some/model",
    "input": {"folder": "IMAGES"},
    "output": "OUT",
    "tasks": [{"name": "caption", "prompt": "Describe this image."}],
}


def _variant(**changes):
    job = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in changes.items():
        if value is None:
            job.pop(key)
        else:
            job[key] = value
    return yaml.safe_dump(job)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed\n", "not valid YAML at line"),
        (_variant(colour="red"), "colour: unknown key"),
        (_variant(batch_size="eight"), "batch_size: must be a positive integer"),
        (_variant(model=None), "model: required"),
        (_variant(tasks=[]), "tasks: must be a non-empty list"),
        (_variant(tasks=[{"name": "a", "prompt": "x"}, {"name": "b", "prompt": "y", "max_new_tokens": 0}]),
         "tasks[1].max_new_tokens: must be a positive integer"),
        (_variant(tasks=[{"name": "a", "prompt": "Tags: {tags}"}]), "tasks[0].prompt: unknown placeholder {tags}"),
        (_variant(tasks=[{"name": "a", "prompt": "x", "template": "poem"}]), "tasks[0].template: must be one of"),
        (_variant(tasks=[{"name": "a", "prompt": "x", "temprature": 0.5}]), "tasks[0].temprature: unknown key"),
        (_variant(input={"folder": "nowhere"}), "input.folder:"),
        (_variant(quantization="int3"), "quantization: must be"),
        (_variant(vram_ceiling="lots"), "vram_ceiling: must be a size"),
        ("- just\n- a list\n", "must be a mapping"),
        (_variant(tasks=[{"name": "a", "prompt": "x", "temperature": float("nan")}]),
         "tasks[0].temperature: must be a finite number"),
        (_variant(model="tiny-random:nope"), "is not a tiny random model"),
        (_variant(workers=0), "workers: must be a positive integer"),
        (_variant(tasks=[{"name": "a", "prompt": "{filename:d}"}]), "tasks[0].prompt: {filename:d} cannot format"),
        (_variant(generation={"retry_on_repetition": 10**20}),
         "generation.retry_on_repetition: must be an integer from 0 to 16"),
        (_variant(tasks=[{"name": "a", "prompt": "x", "seed": 2**70}]), "tasks[0].seed: must be an integer from 0 to"),
    ],
)  # fmt: skip
def test_bad_job_exits_2_naming_the_key(tmp_path, text, message):
    text = text.replace("IMAGES", str(tmp_path / "images")).replace("OUT", str(tmp_path / "out"))
    res = cogbatch_cmd("run", str(_job(tmp_path, text)))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_missing_job_file(tmp_path):
    res = cogbatch_cmd("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_unknown_model_path_is_a_usage_error(tmp_path, job_factory):
    (tmp_path / "images").mkdir()
    from tests.e2e.conftest import make_images

    make_images(tmp_path / "images", 1)
    res = cogbatch_cmd("run", str(job_factory(model=str(tmp_path / "no-model"))))
    assert res.returncode == 2
    assert "no such checkpoint directory" in res.stderr and "Traceback" not in res.stderr


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "what",
    ["model dir without config.json", "output is a file", "output cannot be created", "--input nowhere",
     pytest.param("--device cuda", marks=pytest.mark.skipif(_torch_sees_cuda(), reason="this machine has CUDA"))],
)  # fmt: skip
def test_mistakes_found_when_the_run_starts_exit_2_with_nothing_done(tmp_path, job_factory, what):
    from tests.e2e.conftest import make_images

    make_images(tmp_path / "images", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    keys, args, message = {
        "model dir without config.json": ({"model": str(tmp_path / "empty")}, [], "no config.json"),
        "output is a file": ({"output": str(tmp_path / "a_file")}, [], "is a file, not a directory"),
        "output cannot be created": ({"output": "/proc/cogbatch-test/out"}, [], "output: cannot create"),
        "--input nowhere": ({}, ["--input", str(tmp_path / "nowhere")], "not a folder or a Parquet file"),
        "--device cuda": ({}, ["--device", "cuda"], "torch sees no CUDA device"),
    }[what]
    res = cogbatch_cmd("run", str(job_factory(**keys)), *args, "--quiet")
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.glob("out/part-*"))


@pytest.mark.parametrize(
    "raw, message",
    [(bytes([0x80, *range(256)]), "not UTF-8 text (byte 0x80 at offset 0)"),  # binary: no text starts with 0x80
     ("model: café\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 10)")],
)  # fmt: skip
def test_a_job_file_that_is_not_utf8_exits_2(tmp_path, raw, message):
    job = tmp_path / "bin.yaml"
    job.write_bytes(raw)
    res = cogbatch_cmd("run", str(job))
    assert res.returncode == 2, res.stderr
    assert f"job file {job}: {message}" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "pipeline, env, message",
    [({"models": {"x": 5}}, {}, "pipeline.models.x: must be a non-empty string (a hub id or a checkpoint path), "
                                "got 5 (in PIPE)"),
     ({"models": {"x": None}}, {}, "pipeline.models.x: must be a non-empty string"),
     ({"models": {"x": "some/model"}, "tokenizers": {"some/model": 5}}, {},
      "pipeline.tokenizers.some/model: must be a non-empty string (a tokenizer's hub id or path), got 5 (in PIPE)"),
     ({"models": {"x": "some/model"}, "cache_dir": "A_FILE"}, {"COGBATCH_CACHE_DIR": ""},
      "cache_dir: A_FILE is a file, not a directory"),
     ({"models": {"x": "some/model"}, "cache_dir": "A_FILE/sub"}, {"COGBATCH_CACHE_DIR": ""},
      "cache_dir: A_FILE/sub cannot be created: A_FILE is a file"),
     ({"models": {"x": "some/model"}}, {"COGBATCH_CACHE_DIR": "A_FILE"}, "COGBATCH_CACHE_DIR: A_FILE is a file")],
)  # fmt: skip
def test_bad_pipeline_file_exits_2_naming_the_key(tmp_path, pipeline, env, message):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    pipe = tmp_path / "my-pipeline.yaml"
    pipe.write_text(yaml.safe_dump(pipeline).replace("A_FILE", str(a_file)))
    text = _variant(model="x").replace("IMAGES", str(tmp_path / "images")).replace("OUT", str(tmp_path / "out"))
    env = {k: v.replace("A_FILE", str(a_file)) for k, v in env.items()}
    res = cogbatch_cmd("run", str(_job(tmp_path, text)), "--pipeline", str(pipe), env=env)
    assert res.returncode == 2, res.stderr
    assert message.replace("A_FILE", str(a_file)).replace("PIPE", str(pipe)) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()  # stopped before any work

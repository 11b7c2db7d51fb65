"""Job configuration: merging with pipeline.yaml, overrides, validation messages with key paths."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cogbatch.errors import ConfigError
from cogbatch.job import load_job


@pytest.fixture
def base(tmp_path):
    (tmp_path / "images").mkdir()
    return {
        "model": "cogvlm2",
        "input": {"folder": str(tmp_path / "images")},
        "output": str(tmp_path / "out"),
        "tasks": [{"name": "caption", "prompt": "Describe {filename}."}],
    }


def _pipeline(tmp_path, **keys):
    data = {"models": {"cogvlm2": "THUDM/cogvlm2-llama3-chat-19B"}, "quantization": "int8", "batch_size": 3, **keys}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_job_keys_win_over_pipeline_defaults_and_aliases_resolve(tmp_path, base):
    pipe = _pipeline(tmp_path)
    cfg = load_job({**base, "batch_size": 5}, pipeline=pipe)
    assert cfg.model == "THUDM/cogvlm2-llama3-chat-19B" and cfg.model_alias == "cogvlm2"
    assert cfg.batch_size == 5
    assert cfg.quantization.label() == "int8"
    assert cfg.tasks[0].generation.max_new_tokens == 256


def test_command_line_overrides_win(tmp_path, base):
    other = tmp_path / "other"
    other.mkdir()
    cfg = load_job(base, {"input": str(other), "output": str(tmp_path / "o2"), "limit": 3, "batch_size": None,
                          "vram_ceiling": "6GiB"}, pipeline=_pipeline(tmp_path))  # fmt: skip
    assert cfg.input.folder == other and cfg.output == tmp_path / "o2"
    assert cfg.limit == 3 and cfg.batch_size == 3  # None = not given: the pipeline default stays
    assert cfg.vram_ceiling == 6 * 2**30


def test_job_generation_defaults_apply_to_tasks_unless_overridden(tmp_path, base):
    base["generation"] = {"max_new_tokens": 40, "repetition_penalty": 1.1}
    base["tasks"] = [{"name": "a", "prompt": "x"}, {"name": "b", "prompt": "y", "max_new_tokens": 8}]
    cfg = load_job(base, pipeline=_pipeline(tmp_path))
    assert [t.generation.max_new_tokens for t in cfg.tasks] == [40, 8]
    assert {t.generation.repetition_penalty for t in cfg.tasks} == {1.1}


def test_fingerprint_changes_with_what_changes_the_text(tmp_path, base):
    pipe = _pipeline(tmp_path)
    a = load_job(base, pipeline=pipe)
    fp = a.fingerprint(a.tasks[0], "bfloat16")
    assert fp == load_job(base, {"limit": 2, "batch_size": 1}, pipeline=pipe).fingerprint(a.tasks[0], "bfloat16")
    assert fp != a.fingerprint(a.tasks[0], "float16")
    b = load_job({**base, "tasks": [{"name": "caption", "prompt": "Describe {filename}.", "top_k": 5}]}, pipeline=pipe)
    assert b.fingerprint(b.tasks[0], "bfloat16") != fp
    c = load_job({**base, "quantization": "int4-g64"}, pipeline=pipe)
    assert c.fingerprint(c.tasks[0], "bfloat16") != fp
    kv = load_job({**base, "quantization": {"default": "int8", "kv_cache": "int8"}}, pipeline=pipe)
    assert kv.fingerprint(kv.tasks[0], "bfloat16") != fp  # an 8-bit KV cache changes outputs
    same = load_job({**base, "quantization": {"default": "int8", "kv_cache": "none"}}, pipeline=pipe)
    assert same.fingerprint(same.tasks[0], "bfloat16") == fp  # the default: rows made before keep their fingerprint


def test_an_explicit_dequant_threshold_enters_the_fingerprint_and_the_default_does_not(tmp_path, base):
    """Dense vs fused int4 can flip a greedy token, so old rows must be named stale; a job that never set it
    keeps the fingerprint its rows were written with."""
    plain = load_job({**base, "quantization": {"default": "int4"}})
    fp = plain.fingerprint(plain.tasks[0], "bfloat16")
    assert plain.quantization.dequant_threshold is None
    for threshold in (512, None, {"cpu": 256, "cuda": None}):
        job = load_job({**base, "quantization": {"default": "int4", "dequant_threshold": threshold}})
        assert job.fingerprint(job.tasks[0], "bfloat16") != fp, threshold


def test_manifest_columns_are_placeholders_and_question_columns(tmp_path, base):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "tags": ["cat"], "question": ["Why?"]}), manifest)
    base["input"] = {"manifest": str(manifest)}
    base["tasks"] = [{"name": "t", "prompt": "Tags: {tags}. {stem}"}, {"name": "q", "question_column": "question"}]
    cfg = load_job(base, pipeline=_pipeline(tmp_path))
    assert cfg.input.path_column == "path"
    with pytest.raises(ConfigError, match=r"tasks\[0\].question_column: the manifest has no column 'nope'"):
        load_job({**base, "tasks": [{"name": "q", "question_column": "nope"}]}, pipeline=_pipeline(tmp_path))
    with pytest.raises(ConfigError, match=r"input.path_column: the manifest has no column 'file'"):
        load_job({**base, "input": {"manifest": str(manifest), "path_column": "file"}}, pipeline=_pipeline(tmp_path))


def test_quantization_mapping_with_rules(tmp_path, base):
    base["quantization"] = {"default": "int4", "group_size": 64,
                            "rules": [{"pattern": "lm_head", "dtype": "none"}, {"pattern": "*.vision_mlp.*",
                                                                                 "dtype": "int8"}]}  # fmt: skip
    q = load_job(base, pipeline=_pipeline(tmp_path)).quantization
    assert q.label() == "int4-g64+rules"
    assert q.rule_labels() == [{"pattern": "lm_head", "dtype": "none"},
                               {"pattern": "*.vision_mlp.*", "dtype": "int8"}]  # fmt: skip
    base["quantization"] = {"rules": [{"pattern": "x", "dtype": "int2"}]}
    with pytest.raises(ConfigError, match=r"quantization.rules\[0\].dtype: must be one of int4, int8, none"):
        load_job(base, pipeline=_pipeline(tmp_path))


def test_unknown_pipeline_key_is_reported(tmp_path, base):
    with pytest.raises(ConfigError, match="batchsize: unknown key"):
        load_job(base, pipeline=_pipeline(tmp_path, batchsize=4))


def test_cache_dir_env_wins(tmp_path, base, monkeypatch):
    monkeypatch.setenv("COGBATCH_CACHE_DIR", str(tmp_path / "cache"))
    assert load_job(base, pipeline=_pipeline(tmp_path, cache_dir="/elsewhere")).cache_dir == tmp_path / "cache"


def test_prompt_with_stray_brace_is_a_config_error(tmp_path, base):
    base["tasks"] = [{"name": "a", "prompt": "a {b"}]
    with pytest.raises(ConfigError, match=r"tasks\[0\].prompt: invalid placeholder syntax"):
        load_job(base, pipeline=_pipeline(tmp_path))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(tmp_path, base, value):
    base["tasks"] = [{"name": "a", "prompt": "x", "temperature": value}]
    with pytest.raises(ConfigError, match=r"tasks\[0\].temperature: must be a finite number"):
        load_job(base, pipeline=None)
    with pytest.raises(ConfigError, match="flush_seconds: must be a finite number"):
        load_job({**base, "tasks": [{"name": "a", "prompt": "x"}], "flush_seconds": value}, pipeline=None)


def test_nan_from_yaml_is_refused(tmp_path, base):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(base) + "generation:\n  top_p: .nan\n")
    with pytest.raises(ConfigError, match=r"generation\.top_p: must be a finite number"):
        load_job(job, pipeline=None)


def test_an_unknown_tiny_random_architecture_is_a_config_error(tmp_path, base):
    with pytest.raises(ConfigError, match="model: 'tiny-random:nope' is not a tiny random model"):
        load_job({**base, "model": "tiny-random:nope"}, pipeline=None)
    assert load_job({**base, "model": "tiny-random:cogvlm"}, pipeline=None).model == "tiny-random:cogvlm"


def test_an_output_that_can_never_be_a_directory_is_refused(tmp_path, base):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"output: .*a_file is a file, not a directory"):
        load_job({**base, "output": str(tmp_path / "a_file")}, pipeline=None)
    with pytest.raises(ConfigError, match=r"output: .* cannot be created: .*a_file is a file"):
        load_job({**base, "output": str(tmp_path / "a_file" / "out")}, pipeline=None)
    assert not (tmp_path / "out").exists()  # validating never creates the output


def test_workers_is_a_positive_integer_or_null(tmp_path, base):
    assert load_job(base, pipeline=None).workers is None
    assert load_job({**base, "workers": 3}, pipeline=None).workers == 3
    assert load_job({**base, "workers": 3}, {"workers": 5}, pipeline=None).workers == 5  # --workers wins
    with pytest.raises(ConfigError, match="workers: must be a positive integer"):
        load_job({**base, "workers": 0}, pipeline=None)


def test_folder_keys_with_a_manifest_and_manifest_keys_with_a_folder_are_refused(tmp_path, base):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), manifest)
    with pytest.raises(ConfigError, match=r"input\.recursive: applies to a folder input only"):
        load_job({**base, "input": {"manifest": str(manifest), "recursive": False}}, pipeline=None)
    with pytest.raises(ConfigError, match=r"input\.extensions: applies to a folder input only"):
        load_job({**base, "input": {"manifest": str(manifest), "extensions": ["jpg"]}}, pipeline=None)
    with pytest.raises(ConfigError, match=r"input\.path_column: applies to a manifest input only"):
        load_job({**base, "input": {**base["input"], "path_column": "file"}}, pipeline=None)
    # --input switching kinds drops the keys of the other kind instead of refusing them
    cfg = load_job({**base, "input": {**base["input"], "recursive": False}}, {"input": str(manifest)}, pipeline=None)
    assert cfg.input.manifest == manifest


def test_unknown_keys_from_the_pipeline_file_say_so(tmp_path, base):
    pipe = _pipeline(tmp_path, batchsize=4)
    with pytest.raises(ConfigError, match=f"batchsize: unknown key in the pipeline file {pipe}"):
        load_job(base, pipeline=pipe)
    with pytest.raises(ConfigError, match=r"^colour: unknown key$"):  # the job's own typo is named first
        load_job({**base, "colour": 1}, pipeline=pipe)


def test_input_override_that_is_neither_a_folder_nor_a_file(tmp_path, base):
    with pytest.raises(ConfigError, match=r"--input .*nowhere: not a folder or a Parquet file"):
        load_job(base, {"input": str(tmp_path / "nowhere")}, pipeline=None)


def test_format_specs_are_checked_against_the_column_types(tmp_path, base):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "n": [3], "tag": ["cat"]}), manifest)
    base["input"] = {"manifest": str(manifest)}
    ok = load_job({**base, "tasks": [{"name": "a", "prompt": "Image {n:03d} of {tag!r:>8}, {filename:.5}"}]},
                  pipeline=None)  # fmt: skip
    assert ok.tasks[0].placeholders == ["n", "tag", "filename"]
    with pytest.raises(ConfigError, match=r"tasks\[0\].prompt: \{tag:d\} cannot format the str values of 'tag'"):
        load_job({**base, "tasks": [{"name": "a", "prompt": "{tag:d}"}]}, pipeline=None)
    with pytest.raises(ConfigError, match=r"tasks\[0\].prompt: \{filename:\.2f\} cannot format"):
        load_job({**base, "tasks": [{"name": "a", "prompt": "{filename:.2f}"}]}, pipeline=None)


def test_overrides_of_an_already_loaded_config_are_validated_and_applied(tmp_path, base):
    from cogbatch.job import with_overrides

    cfg = load_job(base, pipeline=None)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), manifest)
    new = with_overrides(cfg, {"output": str(tmp_path / "o2"), "limit": 2, "vram_ceiling": "6GiB", "device": "cpu",
                               "input": str(manifest), "batch_size": None, "workers": 2})  # fmt: skip
    assert new.output == tmp_path / "o2" and new.limit == 2 and new.vram_ceiling == 6 * 2**30
    assert new.device == "cpu" and new.workers == 2 and new.input.manifest == manifest
    assert new.batch_size == cfg.batch_size and new.tasks == cfg.tasks
    assert with_overrides(cfg, {}) == cfg
    with pytest.raises(ConfigError, match="limit: must be a positive integer"):
        with_overrides(cfg, {"limit": 0})
    with pytest.raises(TypeError, match=r"unknown override.*colour"):
        with_overrides(cfg, {"colour": "red"})


@pytest.mark.parametrize(
    "key, value, message",
    [("retry_on_repetition", 17, "must be an integer from 0 to 16"),
     ("retry_on_repetition", 10**20, "must be an integer from 0 to 16"),
     ("seed", 2**64, "must be an integer from 0 to 18446744073709551615"),
     ("seed", 2**70, "must be an integer from 0 to 18446744073709551615")],
)  # fmt: skip
def test_seed_and_retries_are_bounded_where_the_run_could_not_go(tmp_path, base, key, value, message):
    """A seed torch.Generator cannot take aborted the run; 1e20 retries built 1e20 generation settings."""
    with pytest.raises(ConfigError, match=rf"generation.{key}: {message}"):
        load_job({**base, "generation": {key: value}}, pipeline=None)
    with pytest.raises(ConfigError, match=rf"tasks\[0\].{key}: {message}"):
        load_job({**base, "tasks": [{**base["tasks"][0], key: value}]}, pipeline=None)
    edge = {"retry_on_repetition": 16, "seed": 2**64 - 1}[key]
    assert getattr(load_job({**base, "generation": {key: edge}}, pipeline=None).tasks[0].generation, key) == edge


def test_the_last_seed_still_seeds_its_retries():
    import torch

    from cogbatch.job import TaskConfig
    from cogbatch.model.settings import GenerationConfig
    from cogbatch.worker.worker import ModelWorker

    task = TaskConfig("a", "chat", GenerationConfig(seed=2**64 - 1, do_sample=True, retry_on_repetition=2), "x")
    seeds = [ModelWorker._generation_config(task, a).seed for a in range(3)]
    assert seeds == [2**64 - 1, 0, 1]
    for seed in seeds:
        torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("raw, byte, offset", [(b"model: caf\xe9\n", 0xE9, 10), (b"\xff\xfe", 0xFF, 0)])
def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path, base, raw, byte, offset):
    job = tmp_path / "job.yaml"
    job.write_bytes(raw)
    where = rf"\(byte 0x{byte:02x} at offset {offset}\)"
    with pytest.raises(ConfigError, match=rf"job file .*job.yaml: not UTF-8 text {where}"):
        load_job(job, pipeline=None)
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_bytes(raw)
    with pytest.raises(ConfigError, match=rf"pipeline file .*pipeline.yaml: not UTF-8 text {where}"):
        load_job(base, pipeline=pipe)


@pytest.mark.parametrize("text", ["limit: 2024-13-01\n", f"limit: {'9' * 5000}\n"])
def test_yaml_scalars_python_refuses_are_config_errors(tmp_path, text):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(ConfigError, match=r"job file .*job.yaml is not valid YAML: "):
        load_job(job, pipeline=None)


@pytest.mark.parametrize("section, value, message", [
    ("models", {"cogvlm2": 5}, r"pipeline.models.cogvlm2: must be a non-empty string \(a hub id .*got 5"),
    ("models", {"cogvlm2": None}, r"pipeline.models.cogvlm2: must be a non-empty string .*got None"),
    ("models", {"cogvlm2": ""}, r"pipeline.models.cogvlm2: must be a non-empty string .*got ''"),
    ("models", ["THUDM/cogvlm2"], r"pipeline.models: must be a mapping of names to strings"),
    ("tokenizers", {"THUDM/cogvlm2-llama3-chat-19B": 5}, r"pipeline.tokenizers.THUDM/cogvlm2-llama3-chat-19B: must"),
])  # fmt: skip
def test_pipeline_models_and_tokenizers_map_names_to_strings(tmp_path, base, section, value, message):
    pipe = _pipeline(tmp_path, **{section: value})
    with pytest.raises(ConfigError, match=message + r".*\(in .*pipeline.yaml\)"):
        load_job(base, pipeline=pipe)


def test_a_cache_dir_that_can_never_be_a_directory_is_refused(tmp_path, base, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.delenv("COGBATCH_CACHE_DIR")
    with pytest.raises(ConfigError, match=r"cache_dir: .*a_file is a file, not a directory"):
        load_job(base, pipeline=_pipeline(tmp_path, cache_dir=str(tmp_path / "a_file")))
    with pytest.raises(ConfigError, match=r"cache_dir: .*sub cannot be created: .*a_file is a file"):
        load_job(base, pipeline=_pipeline(tmp_path, cache_dir=str(tmp_path / "a_file" / "sub")))
    monkeypatch.setenv("COGBATCH_CACHE_DIR", str(tmp_path / "a_file"))
    with pytest.raises(ConfigError, match=r"COGBATCH_CACHE_DIR: .*a_file is a file, not a directory"):
        load_job(base, pipeline=_pipeline(tmp_path, cache_dir=str(tmp_path / "fine")))
    assert not (tmp_path / "fine").exists()  # validating never creates the cache


def test_a_cache_dir_that_cannot_be_written_is_refused_only_where_it_must_be(tmp_path, base, monkeypatch):
    """Tests run as root, which may write anywhere: a read-only directory is simulated."""
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    monkeypatch.setenv("COGBATCH_CACHE_DIR", str(ro / "cache"))
    with pytest.raises(ConfigError, match=r"COGBATCH_CACHE_DIR: .*cache cannot be created: .*ro is not writable"):
        load_job(base, pipeline=None)
    monkeypatch.setenv("COGBATCH_CACHE_DIR", str(ro))
    assert load_job(base, pipeline=None).cache_dir == ro  # a read-only shared cache can still be read
    with pytest.raises(ConfigError, match=r"ro is not writable \(a tiny random model is built there\)"):
        load_job({**base, "model": "tiny-random:cogvlm"}, pipeline=None)


def test_a_manifest_that_is_a_directory_says_so(tmp_path, base):
    (tmp_path / "shards").mkdir()
    message = r"input.manifest: .*shards is a directory \(a manifest is one Parquet file\)"
    with pytest.raises(ConfigError, match=message):
        load_job({**base, "input": {"manifest": str(tmp_path / "shards")}}, pipeline=None)


def test_manifest_columns_of_the_wrong_type_are_refused_before_any_row(tmp_path, base):
    """Strings as image bytes, numbers as paths: every row would be an error row; say it once instead."""
    manifest = tmp_path / "m.parquet"
    names = pa.array(["a.jpg", "b.jpg"]).dictionary_encode()
    pq.write_table(pa.table({"image": ["a", "b"], "path": [1, 2], "file": names, "blob": [b"x", b"y"]}), manifest)
    pipeline = _pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"input.bytes_column: column 'image' holds string, not image bytes"):
        load_job({**base, "input": {"manifest": str(manifest), "bytes_column": "image"}}, pipeline=pipeline)
    with pytest.raises(ConfigError, match=r"input.path_column: column 'path' holds int64, not paths"):
        load_job({**base, "input": {"manifest": str(manifest)}}, pipeline=pipeline)
    load_job({**base, "input": {"manifest": str(manifest), "path_column": "file"}}, pipeline=pipeline)  # dictionary
    load_job({**base, "input": {"manifest": str(manifest), "bytes_column": "blob"}}, pipeline=pipeline)

"""Job configuration: merging with pipeline.yaml, overrides, validation messages with key paths."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cogbatch.config import ConfigError, load_job, parse_size


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
    assert cfg.quantization.describe() == "int8"
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
    assert q.describe() == "int4-g64+rules"
    assert q.to_model_arg()["rules"] == [{"pattern": "lm_head", "dtype": "none"},
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


@pytest.mark.parametrize("text, expected", [("11GiB", 11 * 2**30), ("10GB", 10**10), ("512 MiB", 512 * 2**20),
                                            (1024, 1024), ("1.5GiB", int(1.5 * 2**30))])  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text, "k") == expected


def test_prompt_with_stray_brace_is_a_config_error(tmp_path, base):
    base["tasks"] = [{"name": "a", "prompt": "a {b"}]
    with pytest.raises(ConfigError, match=r"tasks\[0\].prompt: invalid placeholder syntax"):
        load_job(base, pipeline=_pipeline(tmp_path))

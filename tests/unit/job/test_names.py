"""Model names: aliases, hub ids, paths and `tiny-random:` resolved by one function, with a useful refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogbatch.errors import ConfigError
from cogbatch.job.names import resolve_model_name, tiny_checkpoint, tiny_config

ALIASES = {"cogvlm2": "THUDM/cogvlm2-llama3-chat-19B", "mine": "/models/mine"}


def test_aliases_hub_ids_paths_and_tiny_models_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-ckpt").mkdir()
    resolve = lambda name: resolve_model_name(name, ALIASES, tmp_path / "pipeline.yaml", None)  # noqa: E731
    assert resolve("cogvlm2") == "THUDM/cogvlm2-llama3-chat-19B"
    assert resolve("mine") == "/models/mine"  # an alias's target is checked when it is read
    assert resolve("THUDM/cogvlm-chat-hf") == "THUDM/cogvlm-chat-hf"
    assert resolve("tiny-random:cogvlm") == "tiny-random:cogvlm"
    assert resolve("tiny-random:") == "tiny-random:"
    assert resolve("local-ckpt") == "local-ckpt"  # a bare word that is a directory here
    assert resolve("./not-there") == "./not-there"  # a path: "no such checkpoint directory" when it is read
    assert resolve("/abs/not/there") == "/abs/not/there"
    with pytest.raises(ConfigError, match="'tiny-random:nope' is not a tiny random model"):
        resolve("tiny-random:nope")


def test_an_unknown_name_says_where_aliases_come_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as none_found:
        resolve_model_name("cogvlm2", {}, None, None)
    message = str(none_found.value)
    expected = (
        "model: 'cogvlm2' is not a directory, a hub id or an alias; aliases come from pipeline.yaml "
        f"(none found in {tmp_path}); known hub ids: THUDM/cogvlm-chat-hf"
    )
    assert message.startswith(expected)
    assert "THUDM/cogvlm2-llama3-chat-19B" in message

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    with pytest.raises(ConfigError, match=f"none found in {tmp_path}, nor in {jobs} or its parents"):
        resolve_model_name("cogvlm2", {}, None, jobs / "job.yaml")
    pipe = tmp_path / "pipeline.yaml"
    with pytest.raises(ConfigError, match=f"aliases come from pipeline.yaml \\({pipe} has cogvlm2, mine\\)"):
        resolve_model_name("cogvlm3", ALIASES, pipe, None)
    with pytest.raises(ConfigError, match="did you mean THUDM/cogvlm2-llama3-chat-19B\\?"):
        resolve_model_name("cogvlm2-llama3-chat-19B", {}, None, None)


@pytest.mark.parametrize("name", ["tiny-random:cogvlm", "tiny-random:cogvlm2"])
def test_the_tiny_config_is_the_config_of_the_built_model(tmp_path, name):
    """`cogbatch plan` reads the tiny config without building the model: it must be the same config."""
    from cogbatch.model.config import CogVLMConfig

    built = tiny_checkpoint(name, tmp_path)
    assert built == tmp_path / "tiny-random" / name.partition(":")[2]
    assert tiny_config(name) == CogVLMConfig.from_dict(json.loads((built / "config.json").read_text()))
    mtime = (built / "config.json").stat().st_mtime_ns
    assert tiny_checkpoint(name, tmp_path) == built and (built / "config.json").stat().st_mtime_ns == mtime


def test_the_model_package_resolves_tiny_names_through_the_registered_scheme(tmp_path):
    """`cogbatch` registers `tiny-random:` with the model package, which imports nothing outside itself."""
    from cogbatch.model.sources import resolve_scheme
    from cogbatch.model.weights import resolve_checkpoint

    assert resolve_scheme("THUDM/cogvlm-chat-hf") is None
    made = resolve_checkpoint("tiny-random:cogvlm", cache_dir=tmp_path)
    assert made == tmp_path / "tiny-random" / "cogvlm" and (made / "config.json").is_file()
    assert Path(resolve_checkpoint(str(made))) == made

"""Names beyond directories and hub ids (`tiny-random:`), and the configs shipped for planning before a download."""

from __future__ import annotations

from pathlib import Path

from cogbatch.model import sources
from cogbatch.model.sources import OFFICIAL_HUB_IDS, register_scheme, resolve_scheme, shipped_config


def test_shipped_configs_are_the_real_configs():
    """Package data, byte for byte the real configs the reference fixtures were checked against."""
    from tests.golden import golden_root

    for name in ("cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"):
        shipped = sources.CONFIGS_DIR / name / "config.json"
        assert shipped.read_bytes() == (golden_root() / "real_configs" / name / "config.json").read_bytes()


def test_every_official_checkpoint_has_a_config_to_plan_from():
    for hub_id in OFFICIAL_HUB_IDS:
        found = shipped_config(hub_id)
        assert found is not None and (found[0] / "config.json").is_file(), hub_id
    assert shipped_config("THUDM/cogvlm2-llama3-chat-19B")[1] == "THUDM/cogvlm2-llama3-chat-19B"
    # The same architecture: planned from the sibling's config, and said so by the planner.
    assert shipped_config("THUDM/cogvlm2-llama3-chinese-chat-19B")[1] == "THUDM/cogvlm2-llama3-chat-19B"
    assert shipped_config("THUDM/cogvlm-grounding-generalist-hf")[1] == "THUDM/cogvlm-chat-hf"
    assert shipped_config("zai-org/cogvlm2-llama3-chat-19b") is not None  # THUDM's new name; the hub ignores case
    for other in ("someone/cogvlm2-llama3-chat-19B", "THUDM/glm-4v-9b", "cogvlm2", "./THUDM/cogvlm-chat-hf"):
        assert shipped_config(other) is None, other


def test_a_registered_scheme_resolves_its_names(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_SCHEMES", dict(sources._SCHEMES))  # leave the package's registry as it was
    seen = []

    def resolver(name: str, cache_dir: Path | None) -> Path:
        seen.append((name, cache_dir))
        return tmp_path

    register_scheme("test-scheme:", resolver)
    assert resolve_scheme("test-scheme:x", tmp_path) == tmp_path and seen == [("test-scheme:x", tmp_path)]
    assert resolve_scheme("test-scheme-not:x") is None
    assert "tiny-random:" in sources._SCHEMES  # registered by `import cogbatch`


def test_from_pretrained_accepts_a_tiny_random_name(tmp_path):
    """As `cogbatch run` does: the random model is built once under the cache directory, then loaded."""
    from cogbatch.model.cogvlm import CogVLM

    model = CogVLM.from_pretrained("tiny-random:cogvlm", device="cpu", dtype="fp32", cache_dir=tmp_path)
    assert model.load_report.checkpoint == str(tmp_path / "tiny-random" / "cogvlm")
    assert model.config.generation == "cogvlm1" and model.tokenizer is not None

"""The config.json `cogbatch plan` plans from, without ever downloading anything.

"Will CogVLM2 fit my 12 GB card?" must be answered before a 40 GB download, and a plan is only shapes:
a local checkpoint's config, else the copy in the Hugging Face cache, else the config cogbatch ships
for the official checkpoints (`model.sources`), else a one-line error saying how to get the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cogbatch.errors import ConfigError
from cogbatch.job.names import TINY_PREFIX, tiny_config


def plan_config(model: str) -> tuple[Any, str | None]:
    """(CogVLMConfig, a line saying where it came from when that is not the checkpoint itself)."""
    from cogbatch.model.config import CogVLMConfig
    from cogbatch.model.sources import shipped_config

    if model.startswith(TINY_PREFIX):
        return tiny_config(model), None
    path = Path(model).expanduser()
    note = None
    if path.is_dir():
        source = path
    elif _is_hub_id(model):
        cached = _hub_cache_copy(model)
        shipped = shipped_config(model) if cached is None else None
        if cached is not None:
            source = cached
        elif shipped is not None:
            source, whose = shipped
            same = "" if whose.lower() == model.lower() else f" (the architecture of {whose}, whose config it is)"
            note = f"{model} is not downloaded: planned from the config.json cogbatch ships{same}; nothing was fetched"
        else:
            raise ConfigError(
                f"model: {model} is not downloaded and cogbatch ships no config for it; plan never downloads: "
                f"fetch its config.json once (`hf download {model} config.json`) or give a local checkpoint path"
            )
    else:
        raise ConfigError(f"model: {model}: no such checkpoint directory (and not a hub id of the form owner/name)")
    try:
        return CogVLMConfig.from_json(source), note
    except ConfigError as e:
        raise ConfigError(f"model: {model}: {e}") from None


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def _hub_cache_copy(repo_id: str) -> Path | None:
    """The directory of `config.json` in the local Hugging Face cache, or None: never a network request."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub would refuse (HFValidationError): not in the cache either
        return None
    return Path(found).parent if isinstance(found, str) else None

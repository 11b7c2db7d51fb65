"""Model names: what every command accepts for `model:` (an alias, a hub id, a local path, `tiny-random:<arch>`).

One function, `resolve_model_name`, turns what the user wrote into the model source, for every command
(`run`, `plan`, `status`, `export`, `gallery`, `quantize` and the Python API): a name that is none of the
four fails here, naming where aliases come from, instead of later as "no such checkpoint directory".
`tiny_checkpoint` builds the random model a `tiny-random:` name stands for; `cogbatch/__init__.py`
registers it with the model package (`model.sources`), so `CogVLM.from_pretrained` accepts the name too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cogbatch.errors import ConfigError
from cogbatch.model.sources import OFFICIAL_HUB_IDS

TINY_PREFIX = "tiny-random:"  # a random model built on the fly (demo / smoke runs)
TINY_ARCHES = ("", "cogvlm", "cogvlm1", "cogvlm2")  # what may follow the prefix ("" = cogvlm2)
# Small and fast on a CPU; CogVLM (v1) keeps the checkpoint maker's defaults.
_TINY_SIZES: dict[str, dict[str, int]] = {"cogvlm2": {"hidden_size": 32, "heads": 4, "kv_heads": 2}}


def resolve_model_name(name: str, aliases: dict[str, str], pipe_path: Path | None, job_path: Path | None) -> str:
    """The model source `name` stands for: an alias's target, else the name itself when it can be one.

    A bare word (no `/`) that is no alias and no existing directory cannot be a model: ConfigError,
    saying where aliases come from and which hub ids are known. A name of the form `owner/name` is a
    hub id unless it is a directory; anything else with a `/` is a path, checked when it is read.
    """
    model = aliases.get(name, name)
    if model.startswith(TINY_PREFIX):
        if model[len(TINY_PREFIX) :] not in TINY_ARCHES:
            raise ConfigError(
                f"model: {model!r} is not a tiny random model (use tiny-random:cogvlm or tiny-random:cogvlm2)"
            )
        return model
    if name in aliases or "/" in model or os.sep in model or Path(model).expanduser().is_dir():
        return model
    raise ConfigError(_unknown_name(name, aliases, pipe_path, job_path))


def _unknown_name(name: str, aliases: dict[str, str], pipe_path: Path | None, job_path: Path | None) -> str:
    if pipe_path is None:
        job_dir = job_path.resolve().parent if job_path is not None else None
        if job_dir is None:
            where = f"none found in {Path.cwd()}"
        elif job_dir == Path.cwd():
            where = f"none found in {job_dir} or its parents"
        else:
            where = f"none found in {Path.cwd()}, nor in {job_dir} or its parents"
    else:
        where = f"{pipe_path} has {', '.join(sorted(aliases)) or 'none'}"
    hint = next((f"; did you mean {h}?" for h in OFFICIAL_HUB_IDS if h.partition("/")[2].lower() == name.lower()), "")
    return (
        f"model: {name!r} is not a directory, a hub id or an alias; aliases come from pipeline.yaml ({where}); "
        f"known hub ids: {', '.join(OFFICIAL_HUB_IDS)}{hint}"
    )


def tiny_arch(model: str) -> str:
    """`cogvlm1` or `cogvlm2` for a `tiny-random:` name (the bare prefix is CogVLM2)."""
    arch = model[len(TINY_PREFIX) :] or "cogvlm2"
    return "cogvlm1" if arch in ("cogvlm", "cogvlm1") else arch


def tiny_config(model: str) -> Any:
    """The `CogVLMConfig` of a `tiny-random:` model without building it (`cogbatch plan` writes nothing)."""
    from cogbatch.model.config import CogVLMConfig
    from cogbatch.testing.tiny import tiny_config as config_dict

    arch = tiny_arch(model)
    return CogVLMConfig.from_dict(config_dict(arch=arch, torch_dtype="float32", **_TINY_SIZES.get(arch, {})))


def tiny_checkpoint(model: str, cache_dir: Path | None = None) -> Path:
    """Build (once) the random model that `tiny-random:<arch>` names, under `<cache_dir>/tiny-random/`.

    `cache_dir` defaults to $COGBATCH_CACHE_DIR, else ~/.cache/cogbatch. A file lock makes concurrent
    first runs build it once; its config.json is written last, so a directory with one is complete.
    """
    from filelock import FileLock

    from cogbatch.testing.tiny import write_tiny_checkpoint

    if model[len(TINY_PREFIX) :] not in TINY_ARCHES:
        raise ConfigError(f"{model!r} is not a tiny random model (use tiny-random:cogvlm or tiny-random:cogvlm2)")
    cache = cache_dir or Path(os.environ.get("COGBATCH_CACHE_DIR") or "~/.cache/cogbatch").expanduser()
    arch = model[len(TINY_PREFIX) :] or "cogvlm2"  # the directory keeps the name the user wrote
    target = cache / "tiny-random" / arch
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            write_tiny_checkpoint(target, arch=arch, seed=0, overwrite=True, **_TINY_SIZES.get(tiny_arch(model), {}))
    return target

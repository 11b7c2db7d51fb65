"""Model names beyond a directory and a hub id: name schemes (`tiny-random:`), and the configs cogbatch ships.

Schemes. The model package is a leaf, so it cannot build a `tiny-random:` checkpoint itself (that takes
the package's checkpoint maker and its atomic writes). A name with a scheme prefix is resolved by a
function registered here, and `cogbatch/__init__.py` registers `tiny-random:` when the package is
imported. Python imports a package before any of its subpackages, so whoever can import
`cogbatch.model` has the registration: `CogVLM.from_pretrained("tiny-random:cogvlm2")` works as well as
`cogbatch run` does, and the model package still imports nothing from outside itself.

Shipped configs. The config.json of each official checkpoint is package data (`configs/<repo name>/`),
so that `cogbatch plan` answers "will it fit?" before a 40 GB download. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# (name, cache_dir or None) -> a checkpoint directory
Resolver = Callable[[str, Path | None], Path]

_SCHEMES: dict[str, Resolver] = {}

CONFIGS_DIR = Path(__file__).parent / "configs"
# The official checkpoints, as pipeline.yaml names them. THUDM's models are also served as zai-org/<name>.
OFFICIAL_HUB_IDS = (
    "THUDM/cogvlm-chat-hf",
    "THUDM/cogvlm-grounding-generalist-hf",
    "THUDM/cogvlm2-llama3-chat-19B",
    "THUDM/cogvlm2-llama3-chinese-chat-19B",
)
_OWNERS = ("thudm", "zai-org")
# Checkpoints whose architecture (every tensor shape) is that of a shipped config: the grounding model
# is CogVLM-17B fine-tuned for boxes, the Chinese chat model CogVLM2-19B on other data.
SAME_ARCHITECTURE = {
    "cogvlm-grounding-generalist-hf": "cogvlm-chat-hf",
    "cogvlm2-llama3-chinese-chat-19B": "cogvlm2-llama3-chat-19B",
}


def register_scheme(prefix: str, resolver: Resolver) -> None:
    """Names starting with `prefix` (e.g. `tiny-random:`) are resolved by `resolver(name, cache_dir)`."""
    _SCHEMES[prefix] = resolver


def resolve_scheme(name: str, cache_dir: Path | None = None) -> Path | None:
    """The checkpoint directory of a name with a registered scheme prefix, else None (a path or a hub id)."""
    for prefix, resolver in _SCHEMES.items():
        if name.startswith(prefix):
            return resolver(name, cache_dir)
    return None


def shipped_config(hub_id: str) -> tuple[Path, str] | None:
    """(directory holding config.json, the hub id whose config it is) for an official checkpoint, else None.

    The second item differs from `hub_id` for a checkpoint of the same architecture as a shipped one
    (`SAME_ARCHITECTURE`): its shapes, hence its memory, are those of the shipped config.
    """
    owner, sep, repo = hub_id.partition("/")
    if not sep or owner.lower() not in _OWNERS:
        return None
    match = next((n for n in (*SAME_ARCHITECTURE, *_shipped_names()) if n.lower() == repo.lower()), None)
    if match is None:
        return None
    source = SAME_ARCHITECTURE.get(match, match)
    directory = CONFIGS_DIR / source
    return (directory, f"THUDM/{source}") if (directory / "config.json").is_file() else None


def _shipped_names() -> list[str]:
    return sorted(p.parent.name for p in CONFIGS_DIR.glob("*/config.json"))

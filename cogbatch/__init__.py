"""cogbatch: run CogVLM-family vision-language models over large image collections.

The Python API (`cogbatch.api`, and `cogbatch.vlm` for answers without a job) is re-exported here and
imported on first use, so that `import cogbatch` stays light (no torch, no pyarrow):

    import cogbatch
    summary = cogbatch.run_job("jobs/caption.yaml", input="photos/", limit=10)
    vlm = cogbatch.load("THUDM/cogvlm2-llama3-chat-19B", vram_ceiling="11GiB")
    answers = vlm.generate(["a.jpg", "b.jpg"], "Describe this image.")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cogbatch.model.sources import register_scheme

try:
    __version__ = version("cogbatch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_API = ("run_job", "plan_job", "quantize_checkpoint", "export_job", "job_status", "compact_output", "gallery_job",
        "compare_job")
_VLM = ("load", "VLM", "Answer")
__all__ = ["__version__", *_API, *_VLM]


def _tiny_checkpoint(name: str, cache_dir: Path | None) -> Path:
    from cogbatch.job.names import tiny_checkpoint

    return tiny_checkpoint(name, cache_dir)


# The model package cannot build a `tiny-random:` model (it imports nothing outside itself): it is told how
# here, before any of its modules can be imported, so `CogVLM.from_pretrained("tiny-random:cogvlm2")` works.
register_scheme("tiny-random:", _tiny_checkpoint)


def __getattr__(name: str) -> Any:
    if name in _API:
        from cogbatch import api

        return getattr(api, name)
    if name in _VLM:
        from cogbatch import vlm

        return getattr(vlm, name)
    raise AttributeError(f"module 'cogbatch' has no attribute {name!r}")

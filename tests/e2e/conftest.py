"""Helpers for end-to-end runs of the `cogbatch` command on tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def make_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    """`n` small PNGs with distinct random pixels (distinct bytes, so distinct image ids)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        h, w = int(rng.integers(16, 48)), int(rng.integers(16, 48))
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def cogbatch_cmd(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    exe = shutil.which("cogbatch")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "cogbatch", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=full_env)


def summary_of(res: subprocess.CompletedProcess) -> dict:
    assert res.stdout.strip(), f"no JSON summary; stderr:\n{res.stderr}"
    return json.loads(res.stdout)


@pytest.fixture
def job_factory(tmp_path, tiny_cogvlm1):
    """Write a job file for the tiny CogVLM checkpoint; keyword arguments override its keys."""

    def write(name: str = "job.yaml", **keys) -> Path:
        job = {
            "model": str(tiny_cogvlm1),
            "input": {"folder": str(tmp_path / "images")},
            "output": str(tmp_path / "out"),
            "quantization": "none",
            "device": "cpu",
            "dtype": "fp32",
            "batch_size": 8,
            "flush_rows": 16,
            "tasks": [
                {"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 4},
                {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa", "max_new_tokens": 3},
            ],
        }
        job.update(keys)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path

    return write

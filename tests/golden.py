"""The reference fixtures in tests/data/golden: where they are, checked, and completed for the tests.

The folder (README.md there) holds what the official implementation computed on tiny random
checkpoints, trimmed by scripts/trim_golden.py to what the tests read. Two things are stored in a
smaller form than the tests read them, and `materialize` restores both into a scratch folder:

* a checkpoint with `weights_seed.json` instead of `model.safetensors` (CogVLM2's 33 MB of weights,
  nearly all of it the 128256-row vocabulary) has its weights redrawn from the seed by
  `cogbatch.testing.tiny`, which draws the reference's init scheme; the file must hash to the
  reference's SHA-256, so the tests still run on the reference's exact bytes;
* tensors and rows the reference computed twice, bit for bit the same, are stored once; the
  `duplicates` entry of a cases file's metadata says how to rebuild them.

Nothing here looks outside the repository: the tests run on these files or fail.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUMS = "SHA256SUMS"
README = "README.md"
WEIGHTS_SEED = "weights_seed.json"
CASES = "cases.safetensors"


class GoldenError(Exception):
    """A fixture is missing, changed or cannot be restored; the message names it and says what to do."""


def golden_root() -> Path:
    return REPO / "tests" / "data" / "golden"


def golden_configs() -> list[Path]:
    """Every reference checkpoint with cases (`cogvlm1/dev`, `cogvlm2/dev`), as stored in golden_root()."""
    return sorted(p.parent for p in golden_root().glob(f"cogvlm*/*/{CASES}"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(root: Path) -> dict[str, str]:
    """SHA256SUMS as {relative path: hex digest}; `sha256sum -c SHA256SUMS` reads the same file."""
    sums = {}
    for line in (root / SUMS).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def check_sums(root: Path) -> list[str]:
    """One line per fixture file that is missing, changed or not listed in SHA256SUMS (README.md is not a fixture)."""
    if not (root / SUMS).is_file():
        return [f"{root / SUMS} is missing"]
    sums = read_sums(root)
    problems = []
    for name, digest in sums.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256(path) != digest:
            problems.append(f"{path} does not match its SHA-256 in {SUMS} (corrupted or changed)")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {SUMS, README}
    problems += [f"{root / name} is not listed in {SUMS}" for name in sorted(on_disk - set(sums))]
    return problems


def materialize(dest: Path, root: Path | None = None) -> Path:
    """A complete, checked copy of the fixtures in `root` (default golden_root()) at `dest`, made once.

    Raises GoldenError naming every fixture that fails SHA256SUMS, or weights that do not redraw
    to the reference's bytes.
    """
    root = root or golden_root()
    if (dest / SUMS).is_file():
        return dest
    problems = check_sums(root)
    if problems:
        raise GoldenError(
            f"the reference fixtures in {root} fail their check:\n  " + "\n  ".join(problems)
            + "\nrestore them with `git checkout -- tests/data/golden` (or rerun scripts/trim_golden.py)"
        )  # fmt: skip
    staging = Path(tempfile.mkdtemp(prefix=".golden-", dir=dest.parent))
    try:
        for name in read_sums(root):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.name == CASES:
                expand_cases(root / name, target)
            elif target.name != WEIGHTS_SEED:
                shutil.copyfile(root / name, target)
        for spec in sorted(root.glob(f"cogvlm*/*/{WEIGHTS_SEED}")):
            redraw_weights(spec, staging / spec.parent.relative_to(root) / "model.safetensors")
        shutil.copyfile(root / SUMS, staging / SUMS)  # last: its presence marks a complete copy
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def redraw_weights(spec_path: Path, out: Path) -> None:
    """Draw a checkpoint's weights from its seed and check they are the reference's bytes."""
    import torch

    from cogbatch.model.config import CogVLMConfig
    from cogbatch.testing.tiny import write_weights

    spec = json.loads(spec_path.read_text())
    config = f"{spec_path.parent.parent.name}/{spec_path.parent.name}"
    cfg = CogVLMConfig.from_json(spec_path.parent)
    scratch = Path(tempfile.mkdtemp(prefix=".weights-", dir=out.parent))
    try:
        write_weights(scratch, cfg, dtype=getattr(torch, spec["dtype"]), max_shard_bytes=1 << 62, seed=spec["seed"])
        (scratch / "model-00001-of-00001.safetensors").rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if sha256(out) != spec["sha256"]:
        out.unlink()
        raise GoldenError(
            f"the weights redrawn for {config} (seed {spec['seed']}) are not "
            f"the reference's (SHA-256 {spec['sha256']}): cogbatch.testing.tiny no longer draws the reference "
            "init scheme (tests/unit/test_tiny.py says where)"
        )


def expand_cases(path: Path, out: Path) -> None:
    """Write `path` with the tensors its `duplicates` metadata describes rebuilt.

    `duplicates` maps a tensor name to either {"same_as": name} (an identical tensor) or
    {"rows": name, "insert_at": i, "row": [name, *index]}: the stored tensor `rows` lacks row `i`,
    which is `row[0][tuple(index)]`.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        duplicates = json.loads((f.metadata() or {}).get("duplicates", "{}"))
    cases = load_file(path)
    for name, spec in duplicates.items():
        if "same_as" in spec:
            cases[name] = cases[spec["same_as"]].clone()
        else:
            rows = cases.pop(spec["rows"])
            source, *index = spec["row"]
            row, at = cases[source][tuple(index)], spec["insert_at"]
            cases[name] = torch.cat([rows[:at], row[None], rows[at:]])
    save_file(cases, str(out), metadata={"format": "pt"})

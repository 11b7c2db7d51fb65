"""The tables of docs/benchmarks.md are exactly what the committed benchmark JSONs render to.

Issue 7: "the table matches a JSON committed under docs/bench/". For the newest JSON of each
kind (`cpu-<date>.json` from scripts/bench.py, `gpu-<date>.json` from scripts/bench_gpu.py; older ones
may stay as history), every table that `scripts/bench.py --render` prints must appear in the page,
title, note and rows (heading levels may differ), and the page holds no other table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def newest_per_kind() -> list[Path]:
    """docs/bench/<kind>-<YYYY-MM-DD>.json: the latest date of each kind (ISO dates sort by name)."""
    latest: dict[str, Path] = {}
    for path in sorted((REPO / "docs" / "bench").glob("*-*.json")):
        latest[path.name.split("-", 1)[0]] = path
    return sorted(latest.values())


JSONS = newest_per_kind()


def performance_section() -> str:
    return (REPO / "docs" / "benchmarks.md").read_text()


def normalized(text: str) -> str:
    """Heading levels made equal, trailing spaces dropped: what may differ between the page and the render."""
    lines = [re.sub(r"^#+ ", "# ", line.rstrip()) for line in text.splitlines()]
    return "\n".join(lines)


def tables_of(text: str) -> list[str]:
    """Each Markdown table (consecutive lines starting with '|') as one string."""
    blocks, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def rendered(path: Path) -> str:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--render", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return res.stdout


def test_some_benchmark_json_is_committed():
    assert JSONS, "no benchmark JSON under docs/bench/"


@pytest.mark.parametrize("path", JSONS, ids=[p.name for p in JSONS])
def test_readme_quotes_every_table_of_the_json(path):
    section = normalized(performance_section())
    out = rendered(path)
    blocks = [b for b in re.split(r"\n(?=#+ )", out.strip()) if b.strip()]
    assert len(blocks) == len(json.loads(path.read_text())["tables"])
    for block in blocks:
        lacks = f"{path.name}: docs/benchmarks.md lacks, or differs from:\n{block[:400]}"
        assert normalized(block.strip()) in section, lacks


def test_readme_has_no_table_without_a_json():
    committed = [t for path in JSONS for t in tables_of(rendered(path))]
    in_readme = tables_of(performance_section())
    assert sorted(in_readme) == sorted(committed)

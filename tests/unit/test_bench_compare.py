"""docs/quantization-quality.md shows the newest docs/bench/compare JSON, as bench_compare prints it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import import_script

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["cpu-*.json", "kv8-cpu-*.json"])  # weights alone; with the 8-bit KV cache
def test_the_docs_tables_are_the_committed_measurements(kind):
    latest = sorted((REPO / "docs" / "bench" / "compare").glob(kind))[-1]
    tables = import_script("bench_compare").markdown(json.loads(latest.read_text()))
    doc = (REPO / "docs" / "quantization-quality.md").read_text()
    missing = [line for line in tables.splitlines() if line and line not in doc.splitlines()]
    assert not missing, f"docs/quantization-quality.md is not {latest.name}: {missing[:3]}"
    assert latest.relative_to(REPO).as_posix() in doc

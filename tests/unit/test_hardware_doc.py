"""docs/hardware.md's "what fits which card" table is what the planner predicts today."""

from __future__ import annotations

from tests.scripts import import_script


def test_the_hardware_table_is_the_planners():
    table = import_script("hardware_table")
    page = table.PAGE.read_text()
    assert table.replace_table(page, table.render()) == page, (
        "docs/hardware.md is out of date: run python scripts/hardware_table.py --write"
    )

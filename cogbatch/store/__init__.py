"""The output dataset: one result schema, atomic part files, the current rows, the state beside it, compaction.

    schema    RESULT_SCHEMA and `make_row`, the one place a result row's shape is defined
    parts     PartWriter (complete part files only) and the listing of the parts that hold the dataset
    read      read_results, latest_rows (the current row per (path, task)), current_rows, reusable_rows
    state     where the run state lives: `<output>.cogbatch/`, beside the output (`state_dir`)
    prepare   prepare_output: an old layout migrated, crashed writers and compactions cleaned up after
    compaction  compact
    settings  the settings behind each fingerprint, kept in the state directory
"""

from __future__ import annotations

from cogbatch.store.compaction import compact
from cogbatch.store.parts import PartWriter, list_parts
from cogbatch.store.prepare import is_output, prepare_output
from cogbatch.store.read import current_rows, latest_rows, read_results, reusable_rows
from cogbatch.store.schema import RESULT_SCHEMA, make_row
from cogbatch.store.state import state_dir

__all__ = [
    "RESULT_SCHEMA",
    "PartWriter",
    "compact",
    "current_rows",
    "is_output",
    "latest_rows",
    "list_parts",
    "make_row",
    "prepare_output",
    "read_results",
    "reusable_rows",
    "state_dir",
]

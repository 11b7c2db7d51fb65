"""The output dataset: one result schema, atomic part files, the done set, crash recovery and compaction.

    schema    RESULT_SCHEMA and `make_row`, the one place a result row's shape is defined
    parts     PartWriter (complete part files only) and the listing of the parts that hold the dataset
    read      read_results, latest_rows, done_keys
    compaction  prepare_output (recovery after crashes) and compact
    settings  the settings behind each fingerprint, kept beside the rows
"""

from __future__ import annotations

from cogbatch.store.compaction import compact, prepare_output
from cogbatch.store.parts import PartWriter, list_parts
from cogbatch.store.read import done_keys, latest_rows, read_results
from cogbatch.store.schema import RESULT_SCHEMA, make_row

__all__ = [
    "RESULT_SCHEMA",
    "PartWriter",
    "compact",
    "done_keys",
    "latest_rows",
    "list_parts",
    "make_row",
    "prepare_output",
    "read_results",
]

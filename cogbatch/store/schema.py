"""The one result schema, defined once and written explicitly into every part, and the row builder.

A row is checked when it is made rather than when its part is written: a bad value caught at flush time
would poison a whole buffer of good rows; caught here it points at the code that built the row.
"""

from __future__ import annotations

import datetime as dt
import numbers
from typing import Any

import pyarrow as pa

# The one result schema. Written explicitly into every part, never inferred from rows: an all-null
# column of a part must keep its type, or parts written by different batches would not concatenate.
# Add columns at the end when needed; never rename or retype these.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 hex of the image bytes
        pa.field("path", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("text", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),
        pa.field("finish_reason", pa.string()),  # "eos" | "length" | "stop" | "repetition" | null
        pa.field("tokens_in", pa.int32()),
        pa.field("tokens_out", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("quant", pa.string()),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("attempts", pa.int32()),  # generations made for the row (> 1 after repetition retries)
    ]
)

STATUSES = frozenset({"ok", "error"})
FINISH_REASONS = frozenset({"eos", "length", "stop", "repetition"})
REQUIRED = frozenset(f.name for f in RESULT_SCHEMA if not f.nullable)
_INT32_RANGE = range(-(2**31), 2**31)


def make_row(**fields: Any) -> dict[str, Any]:
    """A result row with every schema column, checked now rather than when its part is written.

    A bad value caught at flush time would poison a whole buffer of good rows; caught here it points at
    the code that built the row. Missing nullable columns become None; `created_at` defaults to now (UTC).
    """
    unknown = sorted(set(fields) - set(RESULT_SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown result column(s) {unknown}; the schema has {RESULT_SCHEMA.names}")
    if fields.get("created_at") is None:
        fields["created_at"] = dt.datetime.now(dt.timezone.utc)
    missing = sorted(name for name in REQUIRED if fields.get(name) is None)
    if missing:
        raise ValueError(f"result row needs non-null {missing}")
    row = {name: fields.get(name) for name in RESULT_SCHEMA.names}
    for field in RESULT_SCHEMA:
        _check_value(field, row[field.name])
    if row["status"] not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {row['status']!r}")
    if row["finish_reason"] is not None and row["finish_reason"] not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {sorted(FINISH_REASONS)} or None: {row['finish_reason']!r}")
    return row


def _check_value(field: pa.Field, value: Any) -> None:
    if value is None:
        return
    if pa.types.is_string(field.type):
        ok = isinstance(value, str)
    elif pa.types.is_int32(field.type):
        # numbers.Integral admits numpy integers (token counts often come from arrays); bool is not a count.
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in _INT32_RANGE
    elif pa.types.is_timestamp(field.type):
        # A naive datetime is ambiguous (local time or UTC?): refuse it rather than guess.
        ok = isinstance(value, dt.datetime) and value.utcoffset() is not None
    else:  # a column added to the schema without a check here
        raise TypeError(f"no value check for column {field.name!r} of type {field.type}")
    if not ok:
        raise ValueError(f"column {field.name!r} ({field.type}) cannot hold {value!r}")

"""Parquet manifests: their rows as entries, their inline bytes, and the checks made when a job is loaded.

A manifest names images by path (relative to the manifest) or holds their bytes in a column; its other
columns are values prompts can use. The job reader checks the manifest's footer before any work: columns
that do not exist, a bytes column of strings, a prompt's format spec that its column's values cannot take.
"""

from __future__ import annotations

import string
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogbatch.errors import ConfigError
from cogbatch.inputs.entries import (
    BUILTIN_PLACEHOLDERS,
    ImageEntry,
    builtin_values,
    file_entry,
    never_stop,
    sha256_hex,
    unreadable_id,
)

if TYPE_CHECKING:
    from cogbatch.inputs.hashes import HashCache
    from cogbatch.job.config import InputConfig, JobConfig


def manifest_entries(inp: InputConfig, cache: HashCache, check: Callable[[], None] = never_stop) -> list[ImageEntry]:
    """One entry per manifest row; paths resolve relative to the manifest's directory."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(inp.manifest)
    entries: list[ImageEntry] = []
    other = [c for c in pf.schema_arrow.names if c != inp.bytes_column]
    row = 0
    for batch in pf.iter_batches(batch_size=256):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            check()
            columns = {c: cols[c][i] for c in other}
            data = cols[inp.bytes_column][i] if inp.bytes_column is not None else None
            entries.append(_manifest_entry(inp, row, columns, data, cache))
            row += 1
    return entries


def _manifest_entry(inp: InputConfig, row: int, columns: dict[str, Any], data: Any, cache: HashCache) -> ImageEntry:
    """One manifest row: a file to hash, inline bytes, or an error entry labelled by its row."""
    label = columns.get(inp.id_column) if inp.id_column else None
    if inp.bytes_column is not None:
        display = str(label) if label is not None else f"{inp.manifest.name}#{row}"
        values = {**builtin_values(display), **columns}  # a manifest column named like a built-in wins
        if not isinstance(data, bytes | bytearray) or not data:
            return ImageEntry(unreadable_id(display), display, values=values, error="no image bytes")
        return ImageEntry(sha256_hex(data), display, row=row, values=values)
    raw = columns.get(inp.path_column)
    if not isinstance(raw, str) or not raw:
        display = f"{inp.manifest.name}#{row}"
        if raw is None:
            reason = "null path"
        elif raw == "":
            reason = "empty path"
        else:
            reason = f"path is not a string ({type(raw).__name__})"
        values = {**builtin_values(display), **columns}
        return ImageEntry(unreadable_id(display), display, values=values, error=reason)
    return file_entry((inp.manifest.parent / raw).expanduser(), raw, cache, columns)


class ManifestBytes:
    """Inline image bytes of a manifest, read one row group at a time (the loader threads share it)."""

    def __init__(self, manifest: Path, column: str) -> None:
        import pyarrow.parquet as pq

        self.pf = pq.ParquetFile(manifest)
        self.column = column
        self.starts = []
        start = 0
        for g in range(self.pf.num_row_groups):
            self.starts.append(start)
            start += self.pf.metadata.row_group(g).num_rows
        self.lock = threading.Lock()
        self.cached: tuple[int, list[bytes]] | None = None

    def get(self, row: int) -> bytes:
        g = max(i for i, s in enumerate(self.starts) if s <= row)
        with self.lock:
            if self.cached is None or self.cached[0] != g:
                values = self.pf.read_row_group(g, columns=[self.column]).column(0).to_pylist()
                self.cached = (g, values)
            return self.cached[1][row - self.starts[g]]


def manifest_schema(inp: InputConfig) -> Any:
    """The pyarrow schema of a Parquet manifest, read from its footer only (None for a folder input)."""
    if inp.manifest is None:
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(inp.manifest)
    except Exception as e:  # not Parquet, truncated, unreadable
        raise ConfigError(f"input.manifest: {inp.manifest} is not a readable Parquet file ({e})") from None


def manifest_columns(inp: InputConfig) -> list[str]:
    """Column names of a Parquet manifest, read from its footer only."""
    schema = manifest_schema(inp)
    return [] if schema is None else list(schema.names)


def _sample_value(arrow_type: Any) -> Any:
    """A value of a column's type to try a prompt's format specs on; None when the type has no simple sample."""
    import pyarrow as pa

    if pa.types.is_boolean(arrow_type):
        return False
    if pa.types.is_integer(arrow_type):
        return 0
    if pa.types.is_floating(arrow_type):
        return 0.0
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "x"
    return None


def _check_format_specs(prompt: str, key: str, samples: dict[str, Any]) -> None:
    """`{n:d}` on a string column, `{filename:.2f}`: a config error now rather than a failure per row."""
    for _, name, spec, conversion in string.Formatter().parse(prompt):
        if name is None or samples.get(name) is None:
            continue
        piece = "{0" + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        try:
            piece.format(samples[name])
        except (ValueError, TypeError, KeyError, IndexError) as e:
            kind = type(samples[name]).__name__
            raise ConfigError(f"{key}: {{{name}:{spec}}} cannot format the {kind} values of {name!r} ({e})") from None


def _check_column_types(inp: InputConfig, schema: Any) -> None:
    """A bytes column of strings, or a path column of numbers, would make every row an error row."""
    import pyarrow as pa

    def kind(col: str) -> Any:
        t = schema.field(col).type
        return t.value_type if pa.types.is_dictionary(t) else t

    if inp.bytes_column is not None:
        t = kind(inp.bytes_column)
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)):
            raise ConfigError(f"input.bytes_column: column {inp.bytes_column!r} holds {t}, not image bytes (binary)")
    elif inp.path_column is not None:
        t = kind(inp.path_column)
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise ConfigError(f"input.path_column: column {inp.path_column!r} holds {t}, not paths (strings)")


def check_columns(cfg: JobConfig) -> None:
    """A manifest's columns against the job: id/path/bytes columns, question columns, every prompt's placeholders."""
    schema = manifest_schema(cfg.input)
    columns = [] if schema is None else list(schema.names)
    for col_key in ("path_column", "bytes_column", "id_column"):
        col = getattr(cfg.input, col_key)
        if col is not None and cfg.input.manifest is not None and col not in columns:
            raise ConfigError(f"input.{col_key}: the manifest has no column {col!r} (columns: {', '.join(columns)})")
    if schema is not None:
        _check_column_types(cfg.input, schema)
    known = set(BUILTIN_PLACEHOLDERS) | set(columns)
    for i, task in enumerate(cfg.tasks):
        if task.question_column is not None:
            if cfg.input.manifest is None:
                raise ConfigError(f"tasks[{i}].question_column: needs a Parquet manifest input")
            if task.question_column not in columns:
                raise ConfigError(f"tasks[{i}].question_column: the manifest has no column {task.question_column!r}")
        for ph in task.placeholders:
            if ph not in known:
                raise ConfigError(
                    f"tasks[{i}].prompt: unknown placeholder {{{ph}}} (known: {', '.join(sorted(known))})"
                )
        if task.prompt is not None:
            samples = dict.fromkeys(BUILTIN_PLACEHOLDERS, "x")
            if schema is not None:
                samples.update({f.name: _sample_value(f.type) for f in schema})
            _check_format_specs(task.prompt, f"tasks[{i}].prompt", samples)

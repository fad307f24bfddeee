"""Conversion between pydantic records and Arrow tables with an explicit schema.

Every record kind owns one pydantic model and one hand-written ``pyarrow.Schema``. These helpers
never infer a schema from rows: a table is always built against the declared schema, so a field that
drifts between the two fails loudly here instead of producing a silently different Parquet file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import pyarrow as pa
from pydantic import BaseModel

RecordT = TypeVar("RecordT", bound=BaseModel)


def records_to_table(records: Iterable[BaseModel], schema: pa.Schema) -> pa.Table:
    """Build an Arrow table from pydantic records, typed by ``schema`` (never inferred)."""
    rows = [record.model_dump(mode="python") for record in records]
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist(rows, schema=schema)


def table_to_records(table: pa.Table, model: type[RecordT]) -> list[RecordT]:
    """Validate every row of ``table`` into ``model`` instances."""
    return [model.model_validate(row) for row in table.to_pylist()]


def rows_to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from plain dict rows (already shaped like the schema)."""
    if not rows:
        return schema.empty_table()
    return pa.Table.from_pylist(list(rows), schema=schema)


def check_model_matches_schema(model: type[BaseModel], schema: pa.Schema) -> None:
    """Raise ``TypeError`` when the model's fields and the Arrow schema's columns differ."""
    model_fields = list(model.model_fields)
    schema_fields = list(schema.names)
    if model_fields != schema_fields:
        raise TypeError(f"{model.__name__} fields {model_fields} do not match its Arrow schema columns {schema_fields}")


def conform_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table``'s columns to exactly ``schema`` (order, types, metadata)."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"table is missing columns {missing} required by the schema")
    return table.select(schema.names).cast(schema)

"""The input row's own columns in the corpus: declared once per source list, typed, appended by name.

An input list's columns other than the URL, licence and attribution ones (``pipeline/sources.py`` picks
those) travel with each item as one JSON object (``metadata_json``), as img2dataset's
``save_additional_columns`` carries them. When the dataset is packed they become real columns, appended
after ``CORPUS_SCHEMA``'s, with the type the list declares:

- a Parquet list: the column's Arrow type from the file's footer; types that JSON cannot carry back
  exactly (timestamps, dates, decimals, binary, ...) are stored as their text, and the field's metadata
  keeps the declared type (``declared_type``);
- a CSV list: ``string`` (CSV declares no types; we do not guess them from values);
- a plain-text list, a folder or an S3 prefix: no extra columns.

Several lists with the same column: their types are unified (int32 + int64 -> int64); if they cannot
be, the column is stored as text. A name that clashes with a corpus column is stored as ``input_<name>``.
The resulting fields (with ``input_column`` and ``source_lists`` in their metadata) are recorded in
``dataset/manifest.json`` under ``extra_columns``. Rows whose list lacks a column hold null there.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.storage import S3Settings, resolve_filesystem, uri_is_dir
from ps3_engine.pipeline.sources import ATTRIBUTION_COLUMNS, LICENSE_COLUMNS, URL_COLUMNS
from ps3_engine.schemas.corpus import CORPUS_SCHEMA

logger = logging.getLogger(__name__)

CLASH_PREFIX = "input_"
_CSV_HEADER_BYTES = 1 << 16


def _declared_columns(source: str, s3: S3Settings) -> list[pa.Field]:
    """All columns a source list declares (name and type), in file order."""
    suffix = PurePosixPath(source.split("?", 1)[0]).suffix.lower()
    if suffix not in (".csv", ".parquet") or uri_is_dir(source, s3):
        return []
    fs, path = resolve_filesystem(source, s3)
    if suffix == ".parquet":
        with fs.open_input_file(path) as handle:
            return list(pq.read_schema(handle))
    with fs.open_input_stream(path) as stream:
        # utf-8-sig: a byte-order mark is not part of the first column's name (as pipeline/sources.py reads it).
        head = stream.read(_CSV_HEADER_BYTES).decode("utf-8-sig", errors="replace")
    header = next(csv.reader(io.StringIO(head)), [])
    return [pa.field(name, pa.string()) for name in header]


def _picked(names: list[str]) -> set[str]:
    """The columns ``pipeline/sources.py`` uses as URL, licence and attribution (first match per group)."""
    picked = set()
    for group in (URL_COLUMNS, LICENSE_COLUMNS, ATTRIBUTION_COLUMNS):
        for wanted in group:
            match = next((n for n in names if n.lower() == wanted), None)
            if match is not None:
                picked.add(match)
                break
    return picked


def _json_faithful(data_type: pa.DataType) -> bool:
    """Whether values of this type come back exactly from the JSON that carried them."""
    if pa.types.is_dictionary(data_type):
        return _json_faithful(data_type.value_type)
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return _json_faithful(data_type.value_type)
    if pa.types.is_struct(data_type):
        return all(_json_faithful(f.type) for f in data_type)
    return (
        pa.types.is_boolean(data_type)
        or pa.types.is_integer(data_type)
        or pa.types.is_floating(data_type)
        or pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
    )


def _stored_type(data_type: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(data_type):
        return _stored_type(data_type.value_type)
    if pa.types.is_large_string(data_type):
        return pa.string()
    return data_type if _json_faithful(data_type) else pa.string()


def extra_columns_schema(source_lists: Iterable[str], s3: S3Settings) -> pa.Schema:
    """The extra columns of ``source_lists`` as Arrow fields, in first-seen order (see the module doc).

    A list that cannot be read any more (moved, deleted) declares no column (logged): its rows' extra
    values appear only under columns that another, readable list declares.
    """
    declared: dict[str, list[tuple[pa.DataType, str]]] = {}
    for source in sorted(set(source_lists)):
        try:
            columns = _declared_columns(source, s3)
        except (OSError, ValueError, pa.ArrowException) as exc:
            logger.warning("extra columns of %s are left out: cannot read its header: %s", source, exc)
            continue
        picked = _picked([f.name for f in columns])
        for column in columns:
            if column.name not in picked:
                declared.setdefault(column.name, []).append((column.type, source))
    base = set(CORPUS_SCHEMA.names)
    fields = []
    for name, typed in declared.items():
        fields.append(_unified_field(name, typed, base))
    return pa.schema(fields)


def _unified_field(name: str, typed: list[tuple[pa.DataType, str]], base: set[str]) -> pa.Field:
    declared_types = [t for t, _ in typed]
    try:
        unified = (
            pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in declared_types], promote_options="permissive")
            .field(name)
            .type
        )
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        unified = pa.string()
    stored = _stored_type(unified)
    metadata = {
        "input_column": name,
        "source_lists": json.dumps(sorted({s for _, s in typed})),
        "declared_type": str(unified),
    }
    column = f"{CLASH_PREFIX}{name}" if name in base else name
    return pa.field(column, stored, nullable=True, metadata=metadata)


def _to_stored(value: Any, data_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(data_type) and not isinstance(value, str):
        return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    return value


def extra_columns_arrays(input_columns_json: list[str | None], schema: pa.Schema) -> list[pa.Array]:
    """One array per field of ``schema``, from each row's input-columns JSON object.

    A value that does not convert to its column's type (e.g. NaN in an integer column) becomes null,
    logged with a count per column, so one odd row never fails the pack.
    """
    objects = [json.loads(text) if text else {} for text in input_columns_json]
    arrays = []
    for field in schema:
        name = field.metadata[b"input_column"].decode()
        values = [_to_stored(obj.get(name), field.type) for obj in objects]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            arrays.append(_array_dropping_bad_values(values, field))
    return arrays


def _array_dropping_bad_values(values: list[Any], field: pa.Field) -> pa.Array:
    kept, dropped = [], 0
    for value in values:
        try:
            pa.scalar(value, type=field.type)
            kept.append(value)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            kept.append(None)
            dropped += 1
    logger.warning("extra column %s: %d values do not convert to %s and are null", field.name, dropped, field.type)
    return pa.array(kept, type=field.type)


def schema_description(schema: pa.Schema) -> list[dict[str, Any]]:
    """The manifest's ``extra_columns`` entry: name, stored type, input column, declared type, lists."""
    return [
        {
            "name": f.name,
            "type": str(f.type),
            "input_column": f.metadata[b"input_column"].decode(),
            "declared_type": f.metadata[b"declared_type"].decode(),
            "source_lists": json.loads(f.metadata[b"source_lists"]),
        }
        for f in schema
    ]

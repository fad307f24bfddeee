"""Manifest entry: the completion record of one shard of one stage, written after its data files.

A shard is complete when this entry exists, its checksums match the files, and its
``input_checksum`` and ``config_fingerprint`` match what the current run would use.
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: str
    shard_id: str
    input_shards: list[str]
    input_checksum: str
    config_fingerprint: str
    output_key: str
    output_rows: int
    output_checksum: str
    errors_key: str
    error_rows: int
    errors_checksum: str
    # Sizes in bytes of the two files, checked on every rerun (None in manifests written before they were
    # recorded: those shards are checked for existence only).
    output_bytes: int | None = None
    errors_bytes: int | None = None
    attempt: int
    schema_version: int
    created_at: datetime
    wall_seconds: float


MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("input_shards", pa.list_(pa.string()), nullable=False),
        pa.field("input_checksum", pa.string(), nullable=False),
        pa.field("config_fingerprint", pa.string(), nullable=False),
        pa.field("output_key", pa.string(), nullable=False),
        pa.field("output_rows", pa.int64(), nullable=False),
        pa.field("output_checksum", pa.string(), nullable=False),
        pa.field("errors_key", pa.string(), nullable=False),
        pa.field("error_rows", pa.int64(), nullable=False),
        pa.field("errors_checksum", pa.string(), nullable=False),
        pa.field("output_bytes", pa.int64()),
        pa.field("errors_bytes", pa.int64()),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("wall_seconds", pa.float64(), nullable=False),
    ],
    metadata={"record_kind": "manifest_entry", "schema_version": str(SCHEMA_VERSION)},
)

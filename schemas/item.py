"""Crawl input item: one source reference (URL, local file or object key) with its metadata."""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1

SourceKind = str  # "http" | "file" | "s3"; validated where items are planned


class CrawlItem(BaseModel):
    """One thing to fetch. ``item_id`` is stable across reruns of the same input list."""

    model_config = ConfigDict(frozen=True)

    item_id: str
    source_ref: str
    source_kind: SourceKind
    source_list: str
    license: str | None = None
    attribution: str | None = None
    metadata_json: str = "{}"


CRAWL_ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("source_kind", pa.string(), nullable=False),
        pa.field("source_list", pa.string(), nullable=False),
        pa.field("license", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("metadata_json", pa.string(), nullable=False),
    ],
    metadata={"record_kind": "crawl_item", "schema_version": str(SCHEMA_VERSION)},
)

"""Image record: one kept, validated high-resolution image written by the crawl stage."""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class ImageRecord(BaseModel):
    """A validated image.

    ``width``/``height`` are the displayed size, i.e. after the EXIF orientation is applied; the
    original bytes are kept untouched (``image_bytes``) or referenced (``image_ref``), and
    ``exif_orientation`` tells downstream decoders which transpose to apply.
    """

    model_config = ConfigDict(frozen=True)

    image_id: str
    item_id: str
    shard_id: str
    source_ref: str
    source_kind: str
    source_list: str
    final_url: str | None
    image_bytes: bytes | None
    image_ref: str | None
    num_bytes: int
    width: int
    height: int
    format: str
    mode: str
    exif_orientation: int
    sha256: str
    phash: int
    content_type: str | None
    http_status: int | None
    license: str | None
    attribution: str | None
    metadata_json: str
    fetch_attempts: int
    fetched_at: datetime


IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("source_kind", pa.string(), nullable=False),
        pa.field("source_list", pa.string(), nullable=False),
        pa.field("final_url", pa.string()),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("image_ref", pa.string()),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("exif_orientation", pa.int8(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("phash", pa.uint64(), nullable=False),
        pa.field("content_type", pa.string()),
        pa.field("http_status", pa.int16()),
        pa.field("license", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("metadata_json", pa.string(), nullable=False),
        pa.field("fetch_attempts", pa.int16(), nullable=False),
        pa.field("fetched_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"record_kind": "image", "schema_version": str(SCHEMA_VERSION)},
)

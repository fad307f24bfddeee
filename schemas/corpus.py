"""Corpus row: one training-ready image with its global caption and its (box, caption) pairs."""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class CorpusRegion(BaseModel):
    """One (box, local caption) pair; box is xyxy in original-image pixels."""

    model_config = ConfigDict(frozen=True)

    region_id: str
    x0: int
    y0: int
    x1: int
    y1: int
    caption: str


class CorpusRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    image_id: str
    split: str  # "train" | "validation"
    source_type: str  # "natural" | "document"
    source: str
    image_bytes: bytes | None
    image_ref: str | None
    # Boxes are in the EXIF-oriented frame; the bytes are the original file, so apply the orientation
    # (PIL ``ImageOps.exif_transpose``) before using the boxes. ``exif_orientation`` says which one.
    exif_orientation: int
    width: int
    height: int
    license: str | None
    attribution: str | None
    global_caption: str | None
    regions: list[CorpusRegion]


CORPUS_REGION_TYPE = pa.struct(
    [
        pa.field("region_id", pa.string(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
    ]
)

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_type", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("image_ref", pa.string()),
        pa.field("exif_orientation", pa.int8(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("license", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("global_caption", pa.string()),
        pa.field("regions", pa.list_(CORPUS_REGION_TYPE), nullable=False),
    ],
    metadata={"record_kind": "corpus_row", "schema_version": str(SCHEMA_VERSION)},
)

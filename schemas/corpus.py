"""Corpus row: one training-ready image with its provenance, global caption and (box, caption) pairs.

Box convention (also in the Arrow field metadata of ``x0``/``y0``/``x1``/``y1`` and in the README):
integer pixels, ``xyxy``, half-open (``x0 <= x < x1``, ``y0 <= y < y1``, so ``0 <= x0 < x1 <= width``),
in the upright frame: the image as a viewer shows it, EXIF orientation applied, the frame that
``width``/``height`` describe. The stored ``image_bytes`` are upright (the corpus stage re-encodes the
few EXIF-rotated images and resets their orientation), so ``PIL.Image.open(bytes)`` and the boxes agree;
``exif_orientation`` says what a loader must still apply: 1 for stored bytes, the file's own tag for an
``image_ref`` (reference storage keeps the original file, so loaders apply ``ImageOps.exif_transpose``).

The packed dataset (``dataset/images/<split>/*.parquet``) has ``CORPUS_SCHEMA``'s columns followed by
the input list's own extra columns (see ``pipeline/provenance.py``); the per-shard rows the corpus
stages write (``corpus/part-*.parquet``) have ``CORPUS_PART_SCHEMA``: the same base columns plus the
input row's extra columns as one JSON object, typed only when the dataset is packed.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

# 2: provenance columns (url, final_url, source_list replacing source), upright bytes, extra columns.
SCHEMA_VERSION = 2
# Where a packed corpus keeps its manifest, relative to its root (written by pipeline/corpus.py, read
# by the training jobs, which must not import the pipeline).
DATASET_PREFIX = "dataset"
MANIFEST_KEY = f"{DATASET_PREFIX}/manifest.json"

BOX_CONVENTION = (
    "integer pixels, xyxy, half-open [x0, x1) x [y0, y1) so 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, "
    "in the upright frame (EXIF orientation applied; the frame of width/height)"
)
_BOX_METADATA = {"unit": "pixel", "format": "xyxy", "interval": "half-open", "frame": "upright"}


def _box_field(name: str, meaning: str) -> pa.Field:
    return pa.field(name, pa.int32(), nullable=False, metadata={**_BOX_METADATA, "meaning": meaning})


class CorpusRegion(BaseModel):
    """One (box, local caption) pair; the box follows :data:`BOX_CONVENTION`."""

    model_config = ConfigDict(frozen=True)

    region_id: str
    x0: int
    y0: int
    x1: int
    y1: int
    caption: str


class CorpusRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    image_id: str  # sha256 of the fetched bytes (for a document page: the page id)
    split: str  # "train" | "validation"
    source_type: str  # "natural" | "document"
    url: str  # the image's URL, file path or s3:// URI as the input listed it
    final_url: str | None  # after HTTP redirects; None when not fetched over HTTP
    source_list: str  # the URL list, folder or prefix the item came from
    image_bytes: bytes | None
    image_ref: str | None
    exif_orientation: int  # what a loader must still apply: 1 for stored bytes (already upright)
    width: int  # upright size in pixels
    height: int
    license: str | None
    attribution: str | None
    global_caption: str | None
    regions: list[CorpusRegion]


CORPUS_REGION_TYPE = pa.struct(
    [
        pa.field("region_id", pa.string(), nullable=False),
        _box_field("x0", "left edge, inclusive"),
        _box_field("y0", "top edge, inclusive"),
        _box_field("x1", "right edge, exclusive"),
        _box_field("y1", "bottom edge, exclusive"),
        pa.field("caption", pa.string(), nullable=False),
    ]
)

CORPUS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source_type", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=False, metadata={"meaning": "as listed in the input"}),
        pa.field("final_url", pa.string(), metadata={"meaning": "after HTTP redirects; null if not HTTP"}),
        pa.field("source_list", pa.string(), nullable=False, metadata={"meaning": "input list/folder/prefix"}),
        pa.field("image_bytes", pa.large_binary(), metadata={"orientation": "upright (EXIF already applied)"}),
        pa.field("image_ref", pa.string(), metadata={"orientation": "original file: apply exif_orientation"}),
        pa.field("exif_orientation", pa.int8(), nullable=False),
        pa.field("width", pa.int32(), nullable=False, metadata={"unit": "pixel", "frame": "upright"}),
        pa.field("height", pa.int32(), nullable=False, metadata={"unit": "pixel", "frame": "upright"}),
        pa.field("license", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("global_caption", pa.string()),
        pa.field("regions", pa.list_(CORPUS_REGION_TYPE), nullable=False),
    ],
    metadata={
        "record_kind": "corpus_row",
        "schema_version": str(SCHEMA_VERSION),
        "box_convention": BOX_CONVENTION,
    },
)

INPUT_COLUMNS_FIELD = "input_columns_json"
# Per-shard corpus rows: the base columns plus the input row's extra columns as a JSON object.
CORPUS_PART_SCHEMA = CORPUS_SCHEMA.append(
    pa.field(INPUT_COLUMNS_FIELD, pa.string(), nullable=False, metadata={"meaning": "input row's extra columns"})
).with_metadata({**CORPUS_SCHEMA.metadata, b"record_kind": b"corpus_part_row"})

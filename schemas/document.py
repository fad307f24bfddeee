"""Document page record: one rasterised PDF page with its text regions (render stage output).

Boxes are ``xyxy`` in rendered-page pixels, half-open, inside ``width x height``. ``text_source`` says
where the words came from (``text_layer``: the PDF's own text, ``ocr``: tesseract on the rendered page)
and ``text_engine`` which version produced them. Documents carry no global caption (paper App. A).
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, model_validator

SCHEMA_VERSION = 1


class DocumentRegion(BaseModel):
    """A region-caption pair of a page: ``scheme`` is ``sentence`` or ``word_run``; ``text`` is the caption."""

    model_config = ConfigDict(frozen=True)

    region_id: str
    scheme: str
    x0: int
    y0: int
    x1: int
    y1: int
    text: str
    num_words: int

    @model_validator(mode="after")
    def _box_is_ordered(self) -> DocumentRegion:
        if not (0 <= self.x0 < self.x1 and 0 <= self.y0 < self.y1):
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) is not a valid xyxy box")
        return self


class DocumentPage(BaseModel):
    model_config = ConfigDict(frozen=True)

    page_id: str
    item_id: str
    shard_id: str
    doc_sha256: str
    source_ref: str
    source_kind: str
    source_list: str
    final_url: str | None
    page_index: int  # 0-based
    num_pages: int
    image_bytes: bytes
    image_format: str  # "PNG" | "JPEG"
    width: int
    height: int
    dpi: float
    page_width_pt: float  # displayed (rotated) page size in PDF points
    page_height_pt: float
    rotation: int
    text_source: str  # "text_layer" | "ocr"
    text_engine: str
    num_words: int
    regions: list[DocumentRegion]
    license: str | None
    attribution: str | None
    metadata_json: str
    rendered_at: datetime


DOCUMENT_REGION_TYPE = pa.struct(
    [
        pa.field("region_id", pa.string(), nullable=False),
        pa.field("scheme", pa.string(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("num_words", pa.int32(), nullable=False),
    ]
)

DOCUMENT_PAGE_SCHEMA = pa.schema(
    [
        pa.field("page_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("doc_sha256", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("source_kind", pa.string(), nullable=False),
        pa.field("source_list", pa.string(), nullable=False),
        pa.field("final_url", pa.string()),
        pa.field("page_index", pa.int32(), nullable=False),
        pa.field("num_pages", pa.int32(), nullable=False),
        pa.field("image_bytes", pa.large_binary(), nullable=False),
        pa.field("image_format", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("dpi", pa.float32(), nullable=False),
        pa.field("page_width_pt", pa.float32(), nullable=False),
        pa.field("page_height_pt", pa.float32(), nullable=False),
        pa.field("rotation", pa.int16(), nullable=False),
        pa.field("text_source", pa.string(), nullable=False),
        pa.field("text_engine", pa.string(), nullable=False),
        pa.field("num_words", pa.int32(), nullable=False),
        pa.field("regions", pa.list_(DOCUMENT_REGION_TYPE), nullable=False),
        pa.field("license", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("metadata_json", pa.string(), nullable=False),
        pa.field("rendered_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"record_kind": "document_page", "schema_version": str(SCHEMA_VERSION)},
)

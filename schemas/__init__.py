"""Record kinds of the data engine: one pydantic model, one explicit Arrow schema and a version each."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pydantic import BaseModel

from ps3_engine.schemas import caption, corpus, document, error, image, item, manifest, region
from ps3_engine.schemas.caption import CAPTION_SCHEMA, CaptionRecord
from ps3_engine.schemas.convert import (
    check_model_matches_schema,
    conform_table,
    records_to_table,
    rows_to_table,
    table_to_records,
)
from ps3_engine.schemas.corpus import CORPUS_SCHEMA, CorpusRegion, CorpusRow
from ps3_engine.schemas.document import DOCUMENT_PAGE_SCHEMA, DocumentPage
from ps3_engine.schemas.error import ERROR_SCHEMA, ErrorRecord
from ps3_engine.schemas.image import IMAGE_SCHEMA, ImageRecord
from ps3_engine.schemas.item import CRAWL_ITEM_SCHEMA, CrawlItem
from ps3_engine.schemas.manifest import MANIFEST_SCHEMA, ManifestEntry
from ps3_engine.schemas.region import REGION_SCHEMA, RegionRecord


@dataclass(frozen=True)
class RecordKind:
    name: str
    model: type[BaseModel]
    schema: pa.Schema
    version: int


RECORD_KINDS: dict[str, RecordKind] = {
    kind.name: kind
    for kind in (
        RecordKind("crawl_item", CrawlItem, CRAWL_ITEM_SCHEMA, item.SCHEMA_VERSION),
        RecordKind("image", ImageRecord, IMAGE_SCHEMA, image.SCHEMA_VERSION),
        RecordKind("region", RegionRecord, REGION_SCHEMA, region.SCHEMA_VERSION),
        RecordKind("caption", CaptionRecord, CAPTION_SCHEMA, caption.SCHEMA_VERSION),
        RecordKind("corpus_row", CorpusRow, CORPUS_SCHEMA, corpus.SCHEMA_VERSION),
        RecordKind("document_page", DocumentPage, DOCUMENT_PAGE_SCHEMA, document.SCHEMA_VERSION),
        RecordKind("error", ErrorRecord, ERROR_SCHEMA, error.SCHEMA_VERSION),
        RecordKind("manifest_entry", ManifestEntry, MANIFEST_SCHEMA, manifest.SCHEMA_VERSION),
    )
}

__all__ = [
    "CAPTION_SCHEMA",
    "CORPUS_SCHEMA",
    "CRAWL_ITEM_SCHEMA",
    "DOCUMENT_PAGE_SCHEMA",
    "ERROR_SCHEMA",
    "IMAGE_SCHEMA",
    "MANIFEST_SCHEMA",
    "RECORD_KINDS",
    "REGION_SCHEMA",
    "CaptionRecord",
    "CorpusRegion",
    "CorpusRow",
    "CrawlItem",
    "DocumentPage",
    "ErrorRecord",
    "ImageRecord",
    "ManifestEntry",
    "RecordKind",
    "RegionRecord",
    "check_model_matches_schema",
    "conform_table",
    "records_to_table",
    "rows_to_table",
    "table_to_records",
]

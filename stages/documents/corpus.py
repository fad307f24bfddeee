"""Document pages -> corpus rows (``CORPUS_PART_SCHEMA``, ``source_type="document"``, no global caption).

The paper samples one sentence per IDL page and one 15-word run per PDFA page at training time
([P2] App. A; the loader takes one pair per image per pass). The corpus keeps every pair of the chosen
schemes (``schemes``, default both) so training decides; ``max_regions_per_page`` optionally keeps a
deterministic random subset (seeded by the page id) to bound the size of very dense pages. The split is
drawn from the document hash, not the page, so the pages of one PDF never straddle train and validation.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ps3_engine.schemas import rows_to_table
from ps3_engine.schemas.corpus import CORPUS_PART_SCHEMA
from ps3_engine.schemas.document import DOCUMENT_PAGE_SCHEMA
from ps3_engine.stages.base import BatchResult, Resources, ShardContext, Stage, error_row, errors_table
from ps3_engine.stages.corpus import split_for
from ps3_engine.stages.documents.text_regions import SCHEMES, Scheme

SOURCE_TYPE = "document"


class DocumentCorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schemes: tuple[Scheme, ...] = Field(SCHEMES, description="sentence (IDL-like), word_run (PDFA-like), or both")
    max_regions_per_page: int | None = Field(None, ge=1, description="None keeps every pair")
    validation_fraction: float = Field(0.01, ge=0, lt=1, description="share of documents in the validation split")
    split_salt: str = Field("ps3", description="changing it reshuffles the split")
    batch_size: int = Field(256, ge=1)
    max_workers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DocumentCorpusConfig:
        if not self.schemes or len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes must name at least one of {SCHEMES} once each, got {self.schemes}")
        return self


def _pick_regions(page: dict[str, Any], config: DocumentCorpusConfig) -> list[dict[str, Any]]:
    regions = [r for r in page["regions"] if r["scheme"] in config.schemes]
    if config.max_regions_per_page is not None and len(regions) > config.max_regions_per_page:
        chosen = sorted(random.Random(page["page_id"]).sample(range(len(regions)), config.max_regions_per_page))
        regions = [regions[i] for i in chosen]
    return [{k: r[k] for k in ("region_id", "x0", "y0", "x1", "y1")} | {"caption": r["text"]} for r in regions]


def document_corpus_row(page: dict[str, Any], config: DocumentCorpusConfig) -> dict[str, Any] | None:
    """The corpus row of one page row, or None when none of its regions is of the chosen schemes."""
    regions = _pick_regions(page, config)
    if not regions:
        return None
    return {
        "image_id": page["page_id"],
        "split": split_for(page["doc_sha256"], config.validation_fraction, config.split_salt),
        "source_type": SOURCE_TYPE,
        "url": page["source_ref"],
        "final_url": page["final_url"],
        "source_list": page["source_list"],
        "image_bytes": page["image_bytes"],
        "image_ref": None,
        "exif_orientation": 1,
        "width": page["width"],
        "height": page["height"],
        "license": page["license"],
        "attribution": page["attribution"],
        "global_caption": None,
        "regions": regions,
        "input_columns_json": page["metadata_json"],
    }


def document_corpus_rows(page_rows: pa.Table, config: DocumentCorpusConfig) -> pa.Table:
    """Map render-stage page rows to ``CORPUS_PART_SCHEMA`` rows; pages left without regions are dropped."""
    rows = [document_corpus_row(page, config) for page in page_rows.to_pylist()]
    return rows_to_table([r for r in rows if r is not None], CORPUS_PART_SCHEMA)


class DocumentCorpusStage(Stage):
    """Per-shard corpus rows from a render shard; a page without a pair of the chosen schemes is an error row."""

    name: ClassVar[str] = "document-corpus"
    input_schema: ClassVar[pa.Schema] = DOCUMENT_PAGE_SCHEMA
    output_schema: ClassVar[pa.Schema] = CORPUS_PART_SCHEMA
    config_model: ClassVar[type[BaseModel]] = DocumentCorpusConfig
    operational_fields: ClassVar[frozenset[str]] = frozenset({"batch_size", "max_workers"})

    config: DocumentCorpusConfig

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=1.0, max_workers=self.config.max_workers, batch_size=self.config.batch_size)

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        rows, errors = [], []
        for page in batch.to_pylist():
            row = document_corpus_row(page, self.config)
            if row is not None:
                rows.append(row)
                continue
            errors.append(
                error_row(
                    context,
                    item_id=page["page_id"],
                    input_ref=f"{page['source_ref']}#page={page['page_index'] + 1}",
                    reason="no_regions",
                    message=f"no region of schemes {list(self.config.schemes)} on the page",
                    category="filtered",
                )
            )
        return BatchResult(rows_to_table(rows, CORPUS_PART_SCHEMA), errors_table(errors))

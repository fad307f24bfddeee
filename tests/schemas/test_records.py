"""Every record kind: model and Arrow schema agree, and records survive a Parquet round trip."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import polars as pl
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ps3_engine import schemas
from ps3_engine.schemas import RECORD_KINDS, records_to_table, table_to_records
from ps3_engine.schemas.document import DocumentRegion
from tests.stages.test_documents import sample_page

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

SAMPLES = {
    "crawl_item": schemas.CrawlItem(
        item_id="i1",
        source_ref="http://x/a.jpg",
        source_kind="http",
        source_list="urls.txt",
        license="CC-BY",
        attribution="me",
        metadata_json='{"k": 1}',
    ),
    "image": schemas.ImageRecord(
        image_id="ab" * 32,
        item_id="i1",
        shard_id="s-00000",
        source_ref="http://x/a.jpg",
        source_kind="http",
        source_list="urls.txt",
        final_url="http://x/a.jpg",
        image_bytes=b"\xff\xd8bytes",
        image_ref=None,
        num_bytes=7,
        width=4096,
        height=2160,
        format="JPEG",
        mode="CMYK",
        exif_orientation=6,
        sha256="ab" * 32,
        phash=2**64 - 1,
        content_type="image/jpeg",
        http_status=200,
        license=None,
        attribution=None,
        metadata_json="{}",
        fetch_attempts=2,
        fetched_at=NOW,
    ),
    "region": schemas.RegionRecord(
        region_id="r1",
        image_id="img",
        shard_id="s",
        x0=0,
        y0=10,
        x1=400,
        y1=410,
        score=3.5,
        rank=0,
        backend="sam2",
        backend_settings_json="{}",
    ),
    "caption": schemas.CaptionRecord(
        caption_id="c1",
        image_id="img",
        region_id=None,
        shard_id="s",
        kind="global",
        raw_text="The image is...",
        clean_text="A cat.",
        model="qwen2-vl",
        prompt_version="v1",
        sampling_json="{}",
        prompt_tokens=10,
        completion_tokens=5,
        latency_ms=12.5,
    ),
    "corpus_row": schemas.CorpusRow(
        image_id="img",
        split="train",
        source_type="natural",
        url="http://x/a.jpg",
        final_url="https://x/a.jpg",
        source_list="datacomp.parquet",
        image_bytes=b"x",
        image_ref=None,
        exif_orientation=6,
        width=2048,
        height=1536,
        license="CC-BY-4.0",
        attribution=None,
        global_caption=None,
        regions=[schemas.CorpusRegion(region_id="r1", x0=1, y0=2, x1=30, y1=40, caption="A sign.")],
    ),
    "document_page": sample_page(
        [DocumentRegion(region_id="r1", scheme="sentence", x0=10, y0=20, x1=300, y1=40, text="A line.", num_words=2)]
    ),
    "error": schemas.ErrorRecord(
        item_id="i1",
        stage="crawl",
        shard_id="s",
        input_ref="http://x",
        category="failed",
        reason="http_404",
        transient=False,
        message="gone",
        attempts=1,
        created_at=NOW,
    ),
    "manifest_entry": schemas.ManifestEntry(
        stage="crawl",
        shard_id="s",
        input_shards=["urls.txt"],
        input_checksum="c",
        config_fingerprint="f",
        output_key="crawl/part-s.parquet",
        output_rows=3,
        output_checksum="o",
        errors_key="crawl/errors/part-s.parquet",
        error_rows=1,
        errors_checksum="e",
        attempt=1,
        schema_version=1,
        created_at=NOW,
        wall_seconds=1.5,
    ),
}


@pytest.mark.parametrize("kind", sorted(RECORD_KINDS))
def test_model_fields_match_arrow_schema(kind):
    record_kind = RECORD_KINDS[kind]
    schemas.check_model_matches_schema(record_kind.model, record_kind.schema)
    assert record_kind.schema.metadata[b"schema_version"] == str(record_kind.version).encode()
    assert record_kind.schema.metadata[b"record_kind"] == kind.encode()


@pytest.mark.parametrize("kind", sorted(RECORD_KINDS))
def test_parquet_round_trip_is_lossless(kind):
    record_kind = RECORD_KINDS[kind]
    record = SAMPLES[kind]
    buffer = io.BytesIO()
    pq.write_table(records_to_table([record], record_kind.schema), buffer)
    buffer.seek(0)
    table = pq.read_table(buffer)
    assert table.schema.equals(record_kind.schema, check_metadata=False)
    assert table_to_records(table, record_kind.model) == [record]
    buffer.seek(0)
    assert pl.read_parquet(buffer).height == 1


def test_empty_table_keeps_the_declared_schema():
    table = records_to_table([], schemas.IMAGE_SCHEMA)
    assert table.num_rows == 0
    assert table.schema.equals(schemas.IMAGE_SCHEMA)


def test_region_rejects_inverted_box():
    with pytest.raises(ValidationError, match="not a valid xyxy box"):
        schemas.RegionRecord(
            region_id="r",
            image_id="i",
            shard_id="s",
            x0=10,
            y0=0,
            x1=5,
            y1=4,
            score=1.0,
            rank=0,
            backend="b",
            backend_settings_json="{}",
        )


def test_model_schema_mismatch_is_detected():
    with pytest.raises(TypeError, match="do not match"):
        schemas.check_model_matches_schema(schemas.RegionRecord, schemas.IMAGE_SCHEMA)

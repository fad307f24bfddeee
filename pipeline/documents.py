"""The document branch's planning: PDF sources -> render shards -> per-shard document corpus rows.

Sources take the same forms as the crawl's (``pipeline/sources.py``): ``.txt``/``.csv``/``.parquet`` lists
of URLs, local paths or ``s3://`` keys (licence and attribution columns kept), and folders or S3 prefixes,
of which the ``.pdf`` files are taken. Items are ``CRAWL_ITEM_SCHEMA`` rows with stable ids; each shard's
items are written to ``render/_input/<shard>.parquet``.

```
render/_input/<shard>.parquet       planned PDF items of one shard
render/part-<shard>.parquet         DOCUMENT_PAGE_SCHEMA rows (one per page), errors/ and _manifest/ as usual
corpus/part-<shard>.parquet         CORPUS_SCHEMA rows of the same shard (source_type "document")
```
Render shard ids start with ``doc-``, and the document corpus rows are committed under the ``corpus``
stage with the same id, so ``build-corpus`` packs document and natural rows together without knowing
which is which, and the two kinds of shard never collide.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from ps3_engine.infra.storage import S3Settings
from ps3_engine.pipeline.gaps import Gap, MissingShards, read_planned, stale_gap
from ps3_engine.pipeline.gaps import compare_items as _compare
from ps3_engine.pipeline.gaps import read_column as _column
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.sources import items_checksum, plan_items, write_input_shard
from ps3_engine.schemas import CRAWL_ITEM_SCHEMA, rows_to_table

logger = logging.getLogger(__name__)

PDF_SUFFIXES = frozenset({".pdf"})
RENDER_STAGE = "render"


CORPUS_STAGE = "corpus"


def render_input_key(shard_id: str) -> str:
    return f"{RENDER_STAGE}/_input/{shard_id}.parquet"


def plan_document_items(sources: list[str], s3: S3Settings) -> list[tuple[str, list[dict[str, Any]]]]:
    """PDF items of all sources with stable ids: the crawl's planning with PDF suffixes for folders."""
    return plan_items(sources, s3, PDF_SUFFIXES)


def plan_documents(
    layout: RunLayout, sources: list[str], shard_size: int, s3: S3Settings, persist: bool = True
) -> list[ShardTask]:
    """Plan (and, with ``persist``, write) render input shards. Unchanged shards are not rewritten."""
    if not sources:
        raise ValueError("no document sources given: pass --input with PDF lists, folders or S3 prefixes")
    tasks: list[ShardTask] = []
    writes: list[tuple[str, pa.Table, str]] = []
    for source, items in plan_document_items(sources, s3):
        prefix = hashlib.sha256(source.encode()).hexdigest()[:8]
        for chunk_index, start in enumerate(range(0, len(items), shard_size)):
            chunk = items[start : start + shard_size]
            shard_id = f"doc-{prefix}-{chunk_index:05d}"
            checksum = items_checksum(chunk)
            key = render_input_key(shard_id)
            writes.append((key, rows_to_table(chunk, CRAWL_ITEM_SCHEMA), checksum))
            tasks.append(ShardTask(RENDER_STAGE, shard_id, key, checksum, (source,)))
    if persist:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: write_input_shard(layout, *w), writes))
    return tasks


def plan_document_corpus(layout: RunLayout) -> list[ShardTask]:
    """One corpus task per committed render shard: its page rows -> corpus rows under ``corpus/``."""
    tasks = []
    for shard_id, entry in sorted(layout.manifests(RENDER_STAGE).items()):
        tasks.append(ShardTask(CORPUS_STAGE, shard_id, entry.output_key, entry.output_checksum, (shard_id,)))
    return tasks


def check_documents(layout: RunLayout, missing: MissingShards | None = None) -> list[Gap]:
    """Conservation of the document branch (``status --check``): every planned PDF left the render stage
    as page rows and/or error rows, no page twice, and every page left the corpus stage exactly once.
    A pages' corpus shard computed from an earlier render of its shard is reported stale, not compared;
    a shard not computed yet is pending, one computed before and gone a missing shard (``missing``)."""
    gaps: list[Gap] = []
    missing = missing or MissingShards(layout)
    render = layout.manifests(RENDER_STAGE)
    corpus = layout.manifests(CORPUS_STAGE)
    planned = sorted(
        o.key.rsplit("/", 1)[-1].removesuffix(".parquet") for o in layout.storage.list(f"{RENDER_STAGE}/_input/")
    )
    for shard in planned:
        entry = render.get(shard)
        if entry is None:
            gaps.append(missing.gap(RENDER_STAGE, shard, "render"))
            continue
        expected, planned_checksum = read_planned(layout, render_input_key(shard))
        if planned_checksum and planned_checksum != entry.input_checksum:  # re-planned, not rendered again yet
            gaps.append(stale_gap(RENDER_STAGE, shard, "render"))
            continue
        pages = layout.storage.read_parquet(entry.output_key, columns=["item_id", "page_id"]).to_pylist()
        # A document leaves as several pages, or as pages plus page errors: count each document once.
        seen = {p["item_id"] for p in pages} | set(_column(layout, entry.errors_key, "item_id"))
        _compare(RENDER_STAGE, shard, expected, sorted(seen), gaps)
        page_ids = [p["page_id"] for p in pages]
        duplicated = sorted(k for k, n in Counter(page_ids).items() if n > 1)
        if duplicated:
            gaps.append(Gap(RENDER_STAGE, shard, "duplicated", len(duplicated), tuple(duplicated[:5])))
        corpus_entry = corpus.get(shard)
        if corpus_entry is None:
            if corpus:
                gaps.append(missing.gap(CORPUS_STAGE, shard, "build-corpus"))
            continue
        if corpus_entry.input_checksum != entry.output_checksum:  # rendered again since (plan_document_corpus)
            gaps.append(stale_gap(CORPUS_STAGE, shard, "build-corpus"))
            continue
        out = _column(layout, corpus_entry.output_key, "image_id") + _column(layout, corpus_entry.errors_key, "item_id")
        _compare(CORPUS_STAGE, shard, set(page_ids), out, gaps)
    return gaps

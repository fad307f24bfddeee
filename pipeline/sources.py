"""Planning crawl input: expand sources (URL lists, folders, S3 prefixes) into checksummed shards.

Sources are planned in the driver; the item lists of each shard are written to
``crawl/_input/<shard>.parquet`` so that workers, reruns and ``--retry-failed`` all read the same
items. A shard's input checksum is computed from its items (not from Parquet bytes, which depend on
the writer version), so an unchanged input list plans to unchanged checksums.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.storage import S3Settings, is_s3_uri, list_uri, read_uri_bytes, uri_is_dir
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.schemas import CRAWL_ITEM_SCHEMA, rows_to_table
from ps3_engine.stages.crawl import item_id_for

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".mpo"})
URL_COLUMNS = ("url", "image_url", "uri", "src")
LICENSE_COLUMNS = ("license", "licence", "license_url")
ATTRIBUTION_COLUMNS = ("attribution", "author", "credit", "creator")


def source_kind(ref: str) -> str:
    lowered = ref.lower()
    if lowered.startswith(("http://", "https://")):
        return "http"
    if is_s3_uri(ref):
        return "s3"
    return "file"


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for name in names:
        for key in row:
            if key.lower() == name and row[key] not in (None, ""):
                return key, str(row[key])
    return None, None


def _row_to_item(row: dict[str, Any], source: str) -> dict[str, Any]:
    url_key, url = _pick(row, URL_COLUMNS)
    if url is None:
        raise ValueError(f"{source}: a row has no URL column (one of {URL_COLUMNS}): {sorted(row)}")
    license_key, license_value = _pick(row, LICENSE_COLUMNS)
    attribution_key, attribution = _pick(row, ATTRIBUTION_COLUMNS)
    used = {url_key, license_key, attribution_key}
    metadata = {k: v for k, v in row.items() if k not in used and v not in (None, "")}
    return {
        "source_ref": url.strip(),
        "source_list": source,
        "license": license_value,
        "attribution": attribution,
        "metadata_json": json.dumps(metadata, sort_keys=True, default=str),
    }


def _read_list_rows(source: str, s3: S3Settings) -> Iterator[dict[str, Any]]:
    suffix = PurePosixPath(source.split("?", 1)[0]).suffix.lower()
    data = read_uri_bytes(source, s3)
    if suffix in (".txt", ".lst", ".urls"):
        for line in data.decode("utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield {"url": line}
    elif suffix == ".csv":
        yield from csv.DictReader(io.StringIO(data.decode("utf-8")))
    elif suffix == ".parquet":
        yield from pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        raise ValueError(
            f"unsupported source {source!r}: expected a .txt/.csv/.parquet URL list, a folder or an S3 prefix"
        )


def expand_source(source: str, s3: S3Settings, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> Iterator[dict[str, Any]]:
    """Items of one source, in a stable order (a folder's files with one of ``suffixes``, or a list's rows)."""
    if uri_is_dir(source, s3):
        for uri in list_uri(source, s3):
            if PurePosixPath(uri).suffix.lower() in suffixes:
                yield {
                    "source_ref": uri,
                    "source_list": source,
                    "license": None,
                    "attribution": None,
                    "metadata_json": "{}",
                }
        return
    for row in _read_list_rows(source, s3):
        yield _row_to_item(row, source)


def items_checksum(items: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def plan_items(
    sources: list[str], s3: S3Settings, suffixes: frozenset[str] = IMAGE_SUFFIXES
) -> list[tuple[str, list[dict[str, Any]]]]:
    """All items of all sources with stable ids, grouped by source list."""
    occurrences: Counter[str] = Counter()
    grouped = []
    for source in sources:
        items = []
        for item in expand_source(source, s3, suffixes):
            ref = item["source_ref"]
            item["item_id"] = item_id_for(ref, occurrences[ref])
            item["source_kind"] = source_kind(ref)
            occurrences[ref] += 1
            items.append(item)
        logger.info("source %s: %d items", source, len(items))
        grouped.append((source, items))
    return grouped


def write_input_shard(layout: RunLayout, key: str, table: pa.Table, checksum: str) -> None:
    """Write a planned input shard unless the same items are already there (same checksum in its metadata)."""
    if layout.storage.exists(key):
        try:
            with layout.storage.filesystem.open_input_file(layout.storage.path(key)) as handle:
                existing = pq.read_schema(handle).metadata or {}
        except (OSError, pa.ArrowInvalid) as exc:
            logger.warning("rewriting unreadable input shard %s: %s", key, exc)
            existing = {}
        if existing.get(b"input_checksum", b"").decode() == checksum:
            return
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"input_checksum": checksum.encode()})
    layout.storage.write_parquet_atomic(key, table)


def plan_crawl(
    layout: RunLayout, sources: list[str], shard_size: int, s3: S3Settings, persist: bool = True
) -> list[ShardTask]:
    """Plan (and, with ``persist``, write) crawl input shards. Unchanged shards are not rewritten."""
    if not sources:
        raise ValueError("no crawl sources given: pass --input or set 'sources' in the run config")
    tasks: list[ShardTask] = []
    writes: list[tuple[str, pa.Table, str]] = []
    for source, items in plan_items(sources, s3):
        prefix = hashlib.sha256(source.encode()).hexdigest()[:8]
        for chunk_index, start in enumerate(range(0, len(items), shard_size)):
            chunk = items[start : start + shard_size]
            shard_id = f"{prefix}-{chunk_index:05d}"
            checksum = items_checksum(chunk)
            writes.append((shard_id, rows_to_table(chunk, CRAWL_ITEM_SCHEMA), checksum))
            tasks.append(ShardTask("crawl", shard_id, RunLayout.crawl_input_key(shard_id), checksum, (source,)))
    if persist:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda w: write_input_shard(layout, RunLayout.crawl_input_key(w[0]), *w[1:]), writes))
    return tasks

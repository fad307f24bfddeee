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
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.http import redact_url
from ps3_engine.infra.storage import S3Settings, is_s3_uri, list_uri, read_uri_bytes, uri_is_dir
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.schemas import CRAWL_ITEM_SCHEMA, rows_to_table
from ps3_engine.stages.crawl import INVALID_MESSAGE_KEY, INVALID_REASON_KEY, item_id_for

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".mpo"})
URL_COLUMNS = ("url", "image_url", "uri", "src")
LICENSE_COLUMNS = ("license", "licence", "license_url")
ATTRIBUTION_COLUMNS = ("attribution", "author", "credit", "creator")
BOM = "\ufeff"


# A URI scheme (RFC 3986): ``ftp:``, ``data:``, ``file:``. One letter is a Windows drive, not a scheme.
SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")


def source_kind(ref: str) -> str:
    """Kind of a reference from a folder/prefix listing (a file there is ``"file"``)."""
    lowered = ref.lower()
    if lowered.startswith(("http://", "https://")):
        return "http"
    if is_s3_uri(ref):
        return "s3"
    return "file"


def list_ref_kind(ref: str) -> tuple[str, str | None]:
    """``(source_kind, refusal)`` of a reference named by a URL list.

    http(s) and s3 are fetched; local paths (``file://``, ``/abs``, ``../rel``) are ``"local"``, which the
    crawl reads only with ``crawl.allow_local_files``; any other scheme is refused with a message.
    """
    kind = source_kind(ref)
    if kind != "file":
        return kind, None
    scheme = SCHEME.match(ref)
    if scheme is None or scheme.group(1).lower() == "file":
        return "local", None
    return "invalid", f"unsupported URL scheme {scheme.group(1)!r}: URL lists fetch http(s) and s3:// only"


def _url_key(row: dict[str, Any]) -> str | None:
    """The row's URL column: the first of :data:`URL_COLUMNS` present with a value, else the first present."""
    present = [key for name in URL_COLUMNS for key in row if isinstance(key, str) and key.lower() == name]
    filled = [key for key in present if row[key] not in (None, "")]
    return (filled or present or [None])[0]


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for name in names:
        for key in row:
            if isinstance(key, str) and key.lower() == name and row[key] not in (None, ""):
                return key, str(row[key])
    return None, None


def _invalid_item(source: str, where: str, reason: str, message: str) -> dict[str, Any]:
    """An item for a list row that cannot be fetched: the crawl turns it into an error row naming the row."""
    return {
        "source_ref": f"{source}#{where.replace(' ', '=')}",
        "source_kind": "invalid",
        "source_list": source,
        "license": None,
        "attribution": None,
        "metadata_json": json.dumps(
            {INVALID_REASON_KEY: reason, INVALID_MESSAGE_KEY: f"{where} of {source}: {message}"}, sort_keys=True
        ),
    }


def _row_to_item(row: dict[str, Any], source: str, where: str, stripped: list[str]) -> dict[str, Any]:
    """One list row -> one crawl item; a row without a usable URL becomes an ``invalid`` item, not an error."""
    url_key = _url_key(row)
    if url_key is None:
        raise ValueError(
            f"{source}: {where} has no URL column (one of {URL_COLUMNS}); columns: {sorted(map(str, row))}"
        )
    value = row[url_key]
    if value is None or (isinstance(value, str) and not value.strip()):
        return _invalid_item(source, where, "missing_url", f"column {url_key!r} is empty")
    if not isinstance(value, str):
        return _invalid_item(
            source, where, "invalid_url", f"column {url_key!r} holds a {type(value).__name__} ({value!r}), not a URL"
        )
    url = value.strip().lstrip(BOM).strip()
    cleaned = redact_url(url)
    if cleaned != url:
        stripped.append(where)
    kind, refusal = list_ref_kind(cleaned)
    if refusal is not None:
        return _invalid_item(source, where, "unsupported_scheme", f"{refusal}: {cleaned!r}")
    license_key, license_value = _pick(row, LICENSE_COLUMNS)
    attribution_key, attribution = _pick(row, ATTRIBUTION_COLUMNS)
    used = {key for key in (url_key, license_key, attribution_key) if key is not None}
    # csv.DictReader files surplus fields of a long row under the key None.
    metadata = {
        ("_extra_fields" if k is None else str(k)): v for k, v in row.items() if k not in used and v not in (None, "")
    }
    return {
        "source_ref": cleaned,
        "source_kind": kind,
        "source_list": source,
        "license": license_value,
        "attribution": attribution,
        "metadata_json": redact_url(json.dumps(metadata, sort_keys=True, default=str)),
    }


def _decode_text(data: bytes, source: str) -> str:
    """UTF-8 text with or without a byte-order mark; anything else is a clear error naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{source}: line {line} is not UTF-8 text ({exc.reason}); save the list as UTF-8") from exc


def _read_list_rows(source: str, s3: S3Settings) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a URL list; ``where`` names the row for messages ("line 3", "row 7")."""
    suffix = PurePosixPath(source.split("?", 1)[0]).suffix.lower()
    data = read_uri_bytes(source, s3)
    if suffix in (".txt", ".lst", ".urls"):
        for number, line in enumerate(_decode_text(data, source).splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield f"line {number}", {"url": line}
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_decode_text(data, source)))
        for number, row in enumerate(reader, start=1):
            yield f"row {number}", row
    elif suffix == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{source}: not a readable Parquet file: {exc}") from exc
        for number, row in enumerate(table.to_pylist(), start=1):
            yield f"row {number}", row
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
                    "source_kind": source_kind(uri),
                    "source_list": source,
                    "license": None,
                    "attribution": None,
                    "metadata_json": "{}",
                }
        return
    stripped: list[str] = []  # rows whose URL carried credentials (reported once per list, never the secret)
    for where, row in _read_list_rows(source, s3):
        yield _row_to_item(row, source, where, stripped)
    if stripped:
        logger.warning(
            "%s: removed credentials from %d URLs (first: %s); they are never sent, stored or logged",
            source,
            len(stripped),
            stripped[0],
        )


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

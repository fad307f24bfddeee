"""Planning crawl input: expand sources (URL lists, folders, S3 prefixes) into checksummed shards.

Sources are planned in the driver; the item lists of each shard are written to
``crawl/_input/<shard>.parquet`` so that workers, reruns and ``--retry-failed`` all read the same
items. A shard's input checksum is computed from its items (not from Parquet bytes, which depend on
the writer version), so an unchanged input list plans to unchanged checksums.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.http import redact_url
from ps3_engine.infra.storage import S3Settings, is_s3_uri, list_uri, resolve_filesystem, uri_is_dir
from ps3_engine.pipeline.input_record import InputRecord
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.streaming import OccurrenceIndex, ordered_prefetch
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


@functools.lru_cache(maxsize=256)
def _columns(keys: tuple[Any, ...], names: tuple[str, ...]) -> tuple[str, ...]:
    """The keys among ``keys`` that spell one of ``names`` (any case), in the order of ``names``.

    Cached: the rows of a list share their keys, so a row costs a lookup instead of a scan of its keys.
    """
    return tuple(key for name in names for key in keys if isinstance(key, str) and key.lower() == name)


def _url_key(row: dict[str, Any]) -> str | None:
    """The row's URL column: the first of :data:`URL_COLUMNS` present with a value, else the first present."""
    present = _columns(tuple(row), URL_COLUMNS)
    filled = [key for key in present if row[key] not in (None, "")]
    return (filled or present or (None,))[0]


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, str | None]:
    for key in _columns(tuple(row), names):
        if row[key] not in (None, ""):
            return key, str(row[key])
    return None, None


def _redacted(text: str) -> str:
    """:func:`redact_url`, skipped for text without an ``@`` (user-info always ends with one)."""
    return redact_url(text) if "@" in text else text


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
    cleaned = _redacted(url)
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
        "metadata_json": _redacted(json.dumps(metadata, sort_keys=True, default=str)) if metadata else "{}",
    }


READ_BLOCK = 1 << 20  # bytes read from a list at a time
ROW_BATCH = 2048  # rows decoded from a Parquet list (and items handed to the id assigner) at a time
# What str.splitlines breaks at.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _split_lines(text: str, final: bool, csv_lines: bool) -> tuple[list[str], str]:
    """Complete lines of ``text`` (ends kept) and the unfinished rest, carried to the next block.

    Text lists break lines as ``str.splitlines`` does; CSV lists only at ``\\n`` (as ``io.StringIO`` fed
    ``csv`` before), so a quoted field may hold other line-break characters. A ``\\r`` that ends a block
    waits for the next one, so a ``\\r\\n`` split across blocks stays one line break.
    """
    if csv_lines:
        parts = text.split("\n")
        lines, rest = [part + "\n" for part in parts[:-1]], parts[-1]
    else:
        lines = text.splitlines(keepends=True)
        rest = lines.pop() if lines and (lines[-1][-1] not in LINE_BREAKS or lines[-1].endswith("\r")) else ""
    if final and rest:
        lines.append(rest)
        rest = ""
    return lines, rest


def _text_lines(stream: Any, source: str, csv_lines: bool = False) -> Iterator[str]:
    """Lines of a UTF-8 list (byte-order mark dropped), read in blocks of :data:`READ_BLOCK` bytes.

    Raises:
        ValueError: the list is not UTF-8 (the message names the line).
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    rest = ""
    newlines_before = 0
    while True:
        block = stream.read(READ_BLOCK)
        try:
            text = rest + decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            line = newlines_before + block[: max(exc.start, 0)].count(b"\n") + 1
            raise ValueError(f"{source}: line {line} is not UTF-8 text ({exc.reason}); save the list as UTF-8") from exc
        newlines_before += block.count(b"\n")
        lines, rest = _split_lines(text, not block, csv_lines)
        yield from lines
        if not block:
            return


def _parquet_rows(source: str, s3: S3Settings) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet list, decoded a batch at a time (never the whole file)."""
    fs, path = resolve_filesystem(source, s3)
    try:
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=ROW_BATCH):
                yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{source}: not a readable Parquet file: {exc}") from exc


def _read_list_rows(source: str, s3: S3Settings) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a URL list; ``where`` names the row for messages ("line 3", "row 7").

    Lists are streamed (text in 1 MiB blocks, Parquet by row batches), so memory does not grow with them.
    """
    suffix = PurePosixPath(source.split("?", 1)[0]).suffix.lower()
    if suffix == ".parquet":
        for number, row in enumerate(_parquet_rows(source, s3), start=1):
            yield f"row {number}", row
        return
    if suffix not in (".txt", ".lst", ".urls", ".csv"):
        raise ValueError(
            f"unsupported source {source!r}: expected a .txt/.csv/.parquet URL list, a folder or an S3 prefix"
        )
    fs, path = resolve_filesystem(source, s3)
    with fs.open_input_stream(path) as stream:
        if suffix == ".csv":
            for number, row in enumerate(csv.DictReader(_text_lines(stream, source, csv_lines=True)), start=1):
                yield f"row {number}", row
            return
        for number, line in enumerate(_text_lines(stream, source), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield f"line {number}", {"url": line}


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


PLAN_AHEAD = 4  # source files read and parsed at once while the driver assigns ids and cuts shards


def _batched(items: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_planned_items(
    sources: list[str], s3: S3Settings, suffixes: frozenset[str] = IMAGE_SUFFIXES
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(source, items)`` batches of all sources in order, each item with its stable ``item_id``.

    Up to :data:`PLAN_AHEAD` sources are read and parsed at once (threads); ids are assigned here in
    source order, so they do not depend on timing. Memory is bounded by a few batches per source being
    read plus about 8 bytes per distinct ref (:class:`OccurrenceIndex`).
    """
    occurrences = OccurrenceIndex()

    def producer(source: str):
        return lambda: ((source, batch) for batch in _batched(expand_source(source, s3, suffixes), ROW_BATCH))

    counts: Counter[str] = Counter()
    for source, batch in ordered_prefetch((producer(source) for source in sources), PLAN_AHEAD):
        refs = [item["source_ref"] for item in batch]
        for item, occurrence in zip(batch, occurrences.occurrences(refs), strict=True):
            item["item_id"] = item_id_for(item["source_ref"], occurrence)
        counts[source] += len(batch)
        yield source, batch
    for source in sources:
        logger.info("source %s: %d items", source, counts[source])


def plan_items(
    sources: list[str], s3: S3Settings, suffixes: frozenset[str] = IMAGE_SUFFIXES
) -> list[tuple[str, list[dict[str, Any]]]]:
    """All items of all sources with stable ids, grouped by source list (in memory: for small inputs)."""
    grouped: dict[str, list[dict[str, Any]]] = {source: [] for source in sources}
    for source, batch in iter_planned_items(sources, s3, suffixes):
        grouped[source].extend(batch)
    return list(grouped.items())


def stored_input_checksum(layout: RunLayout, key: str) -> str | None:
    """The input checksum in the Parquet metadata of the stored shard at ``key``; None when it has none.

    An unreadable shard counts as having none (it is rewritten), with a warning.
    """
    try:
        with layout.storage.filesystem.open_input_file(layout.storage.path(key)) as handle:
            existing = pq.read_schema(handle).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        logger.warning("rewriting unreadable input shard %s: %s", key, exc)
        return None
    return existing.get(b"input_checksum", b"").decode() or None


def _write_shard(layout: RunLayout, key: str, table: pa.Table, checksum: str) -> None:
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"input_checksum": checksum.encode()})
    layout.storage.write_parquet_atomic(key, table)


def write_input_shard(layout: RunLayout, key: str, table: pa.Table, checksum: str) -> bool:
    """Write a planned input shard unless the same items are already there (same checksum in its metadata).

    Returns:
        Whether the shard was written.
    """
    if layout.storage.exists(key) and stored_input_checksum(layout, key) == checksum:
        return False
    _write_shard(layout, key, table, checksum)
    return True


def _write_items_if_changed(
    layout: RunLayout, key: str, items: list[dict[str, Any]], checksum: str, stored: bool
) -> bool:
    """:func:`write_input_shard` for items (a writer thread's job): the table is built only to be written.

    ``stored``: the shard's file was listed before the plan began (else there is nothing to compare).
    """
    if stored and stored_input_checksum(layout, key) == checksum:
        return False
    _write_shard(layout, key, rows_to_table(items, CRAWL_ITEM_SCHEMA), checksum)
    return True


def iter_shard_chunks(
    sources: list[str], shard_size: int, s3: S3Settings, suffixes: frozenset[str] = IMAGE_SUFFIXES
) -> Iterator[tuple[str, int, list[dict[str, Any]]]]:
    """``(source, chunk_index, items)`` for each input shard, cut per source as the items stream in."""
    chunk: list[dict[str, Any]] = []
    current: str | None = None
    index = 0
    for source, batch in iter_planned_items(sources, s3, suffixes):
        if source != current:
            if chunk:
                yield current, index, chunk  # type: ignore[misc]
            current, index, chunk = source, 0, []
        for item in batch:
            chunk.append(item)
            if len(chunk) == shard_size:
                yield source, index, chunk
                index, chunk = index + 1, []
    if chunk:
        yield current, index, chunk  # type: ignore[misc]


class ShardWriter:
    """Writes changed input shards on a few threads, with a bounded number in flight (so memory stays bounded).

    The plan record (:mod:`ps3_engine.pipeline.input_record`) is read once first: a shard it shows
    unchanged costs no request; any other stored shard has its stored checksum compared before a write.
    """

    def __init__(self, layout: RunLayout, threads: int = 8, in_flight: int = 32) -> None:
        self._layout = layout
        self._record = InputRecord.load(layout.storage, RunLayout.CRAWL_INPUT_PREFIX, RunLayout.CRAWL_PLAN_RECORD_KEY)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="plan-write")
        self._slots = threading.BoundedSemaphore(in_flight)
        self._futures: list[Future] = []
        self.unchanged = 0  # shards the record showed unchanged
        self.submitted = 0  # shards checked against their stored checksum, and written when it differed
        self.written = 0

    def submit(self, shard_id: str, items: list[dict[str, Any]], checksum: str) -> None:
        if self._record.unchanged(shard_id, checksum):
            self.unchanged += 1
            return
        self._slots.acquire()
        self.submitted += 1
        key, stored = RunLayout.crawl_input_key(shard_id), self._record.stored(shard_id)
        future = self._pool.submit(_write_items_if_changed, self._layout, key, items, checksum, stored)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)
        if len(self._futures) >= 1024:  # keep the list short: collect finished writes (and their errors)
            self._reap(wait=False)

    def _reap(self, wait: bool) -> None:
        remaining = []
        for future in self._futures:
            if wait or future.done():
                self.written += bool(future.result())  # raises a write error here
            else:
                remaining.append(future)
        self._futures = remaining

    def close(self) -> None:
        try:
            self._reap(wait=True)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def record(self, tasks: list[ShardTask]) -> None:
        """After :meth:`close`: record the planned shards, unless the record already showed them all."""
        if self.submitted:
            self._record.update({task.shard_id: task.input_checksum for task in tasks})
        logger.info(
            "planned %d crawl input shards: %d unchanged by the plan record, %d checked, %d written",
            len(tasks),
            self.unchanged,
            self.submitted - self.written,
            self.written,
        )


def plan_crawl(
    layout: RunLayout, sources: list[str], shard_size: int, s3: S3Settings, persist: bool = True
) -> list[ShardTask]:
    """Plan (and, with ``persist``, write) crawl input shards, streaming: shards are written as they fill.

    Unchanged shards are not rewritten, nor read when the plan record shows them unchanged (:class:`ShardWriter`).
    """
    if not sources:
        raise ValueError("no crawl sources given: pass --input or set 'sources' in the run config")
    tasks: list[ShardTask] = []
    prefixes = {source: hashlib.sha256(source.encode()).hexdigest()[:8] for source in sources}
    writer = ShardWriter(layout) if persist else None
    try:
        for source, index, chunk in iter_shard_chunks(sources, shard_size, s3):
            shard_id = f"{prefixes[source]}-{index:05d}"
            checksum = items_checksum(chunk)
            if writer is not None:
                writer.submit(shard_id, chunk, checksum)
            tasks.append(ShardTask("crawl", shard_id, RunLayout.crawl_input_key(shard_id), checksum, (source,)))
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        writer.record(tasks)
    return tasks

"""Per-stage index of committed shards, so that ``plan``, ``status`` and rerun skips read a few objects.

```
<stage>/_manifest/<shard>.json        a shard's completion record (the commit; always written, never replaced
                                      by the index)
<stage>/_index/part-<n>-<tag>.parquet  manifest entries folded in one compaction (INDEX_SCHEMA rows)
<stage>/_index/_manifest.json         the valid parts, in commit order, with their sha256 (written last)
```
A shard counts only when its manifest JSON is listed: the index is a cache of their contents, not the
commit. Each index row records the version (size and write time, from the listing) of the JSON it was
folded from; reading a stage lists ``_manifest/`` once, takes the index row of every JSON whose version
is unchanged and reads only the others (new or rewritten since: the JSON wins), in parallel. S3 write
times are whole seconds on most servers, so a JSON rewritten in the second it was folded would look
unchanged: compaction therefore folds only JSONs written before the newest one it lists (a rewrite
comes after that listing, so in a later second). A part not named by
``_index/_manifest.json`` (a compaction that died before its last write) or whose bytes differ from the
sha256 recorded there is ignored, so a half-written index is never trusted; its shards are read from
their JSONs. Compaction folds the JSONs not yet in the index into a new part, merging all parts into one
when there are more than :data:`MAX_PARTS`. Two compactions of one stage at once lose nothing: the
last ``_manifest.json`` wins and the other part is ignored (its JSONs stay unfolded).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from ps3_engine.infra.storage import ObjectInfo, Storage, StorageError, sha256_hex
from ps3_engine.schemas import MANIFEST_SCHEMA, ManifestEntry

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

INDEX_VERSION = 1
MAX_PARTS = 8
READ_THREADS = 16
# error_counts: {category: {reason: rows}} of the shard's errors file, as JSON ("" when unknown).
INDEX_SCHEMA = pa.schema(
    [
        *MANIFEST_SCHEMA,
        pa.field("manifest_version", pa.string(), nullable=False),
        pa.field("error_counts", pa.string()),
    ],
    metadata={"record_kind": "shard_index", "schema_version": str(INDEX_VERSION)},
)
_ENTRY_FIELDS = tuple(ManifestEntry.model_fields)

ErrorCounts = dict[str, dict[str, int]]


def manifest_prefix(stage: str) -> str:
    return f"{stage}/_manifest/"


def index_manifest_key(stage: str) -> str:
    return f"{stage}/_index/_manifest.json"


def parallel_map(fn: Callable[[T], R], items: Iterable[T], threads: int = READ_THREADS) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool (object-store requests wait on the network, not the CPU)."""
    items = list(items)
    if len(items) <= 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


@dataclass
class StageState:
    """One read of a stage's committed shards.

    ``entries`` and ``listed`` (the listing of each shard's manifest JSON) are keyed by shard id;
    ``error_counts`` holds ``{category: {reason: rows}}`` per shard where known without reading its
    errors file; ``files`` (sizes of ``<stage>/part-*`` and ``<stage>/errors/*``) is filled on first need.
    """

    stage: str
    entries: dict[str, ManifestEntry]
    listed: dict[str, ObjectInfo]
    error_counts: dict[str, ErrorCounts | None]
    folded: int = 0  # entries taken from the index
    unfolded: list[str] = field(default_factory=list)  # shard ids read from their JSON
    newest: datetime | None = None  # write time of the newest manifest JSON listed
    parts: list[dict[str, Any]] = field(default_factory=list)  # the valid index parts read
    files: dict[str, int] | None = None


def list_manifests(storage: Storage, stage: str) -> dict[str, ObjectInfo]:
    """The stage's manifest JSONs by shard id (one listing)."""
    listed = storage.list_versions(manifest_prefix(stage), recursive=False)
    return {obj.key.rsplit("/", 1)[-1].removesuffix(".json"): obj for obj in listed if obj.key.endswith(".json")}


def list_stage_files(storage: Storage, stage: str) -> dict[str, int]:
    """Sizes of the stage's output and error files by key (two listings, run at once)."""
    listings = parallel_map(
        lambda prefix: storage.list_versions(prefix, recursive=False), [f"{stage}/", f"{stage}/errors/"]
    )
    return {obj.key: obj.size for listing in listings for obj in listing}


def _read_part(storage: Storage, part: dict[str, Any]) -> pa.Table | None:
    try:
        data = storage.read_bytes(part["key"])
    except (FileNotFoundError, StorageError) as exc:
        logger.warning("index part %s is unreadable (%s): its shards are read from their manifests", part["key"], exc)
        return None
    if sha256_hex(data) != part.get("sha256"):
        logger.warning("index part %s differs from its recorded sha256: ignored", storage.uri(part["key"]))
        return None
    return pq.read_table(pa.BufferReader(data))


def read_index(storage: Storage, stage: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Index rows by shard id (a later part wins) and the parts they came from; empty without an index."""
    try:
        meta = storage.read_json(index_manifest_key(stage))
    except FileNotFoundError:
        return {}, []
    except StorageError as exc:
        logger.warning("%s is unreadable (%s): every shard is read from its manifest", stage, exc)
        return {}, []
    parts = meta.get("parts", []) if meta.get("version") == INDEX_VERSION else []
    rows: dict[str, dict[str, Any]] = {}
    valid = []
    for part, table in zip(parts, parallel_map(lambda p: _read_part(storage, p), parts), strict=True):
        if table is not None:
            valid.append(part)
            rows.update((row["shard_id"], row) for row in table.to_pylist())
    return rows, valid


def _entry_from_row(row: dict[str, Any]) -> ManifestEntry:
    # Rows were validated when folded and their part's sha256 checked on read: no second validation.
    return ManifestEntry.model_construct(**{name: row[name] for name in _ENTRY_FIELDS})


def parse_manifest(storage: Storage, key: str, data: bytes) -> tuple[ManifestEntry, ErrorCounts | None] | None:
    """The entry (and error counts, when the commit recorded them) of one manifest JSON; None if damaged."""
    try:
        entry = ManifestEntry.model_validate_json(data)
    except ValidationError as exc:
        # A manifest is written last and atomically, so a broken one means damage after the fact (a
        # truncated copy, a hand edit): its shard is recomputed rather than the whole run blocked.
        problem = exc.errors()[0]["msg"]
        logger.warning(
            "%s is damaged (%d bytes: %s): its shard counts as not done", storage.uri(key), len(data), problem
        )
        return None
    return entry, json.loads(data).get("error_counts")


def _read_manifest_json(storage: Storage, key: str) -> tuple[ManifestEntry, ErrorCounts | None] | None:
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:  # deleted since the listing: not committed any more
        return None
    return parse_manifest(storage, key, data)


def _unchanged_since(previous: StageState | None, shard: str, info: ObjectInfo) -> bool:
    """Whether ``previous`` read this very JSON: same version, written before the newest it listed (so a
    rewrite after that read, in a later second, cannot share its version)."""
    if previous is None or shard not in previous.entries or previous.listed[shard].version != info.version:
        return False
    return bool(info.modified and previous.newest and info.modified < previous.newest)


def read_stage(storage: Storage, stage: str, previous: StageState | None = None) -> StageState:
    """Every readable committed shard of ``stage``: index rows of unchanged JSONs, plus the other JSONs.

    Requests: one listing of ``<stage>/_manifest/`` (one per 1,000 shards on S3), the index manifest and
    its parts, and one read per JSON not yet folded (or rewritten since), 16 at a time. With the
    ``previous`` state of this stage (a driver polling a running stage), JSONs it read and that are
    unchanged are not read again.
    """
    listed = list_manifests(storage, stage)
    rows, parts = read_index(storage, stage)
    state = StageState(stage, {}, {}, {}, parts=parts)
    state.newest = max((info.modified for info in listed.values() if info.modified is not None), default=None)
    unfolded = []
    for shard, info in listed.items():
        row = rows.get(shard)
        if row is not None and row["manifest_version"] == info.version:
            state.entries[shard], state.listed[shard] = _entry_from_row(row), info
            state.error_counts[shard] = json.loads(row["error_counts"]) if row["error_counts"] else None
            state.folded += 1
        elif previous is not None and _unchanged_since(previous, shard, info):
            state.entries[shard], state.listed[shard] = previous.entries[shard], info
            state.error_counts[shard] = previous.error_counts.get(shard)
            state.unfolded.append(shard)
        else:
            unfolded.append(info)
    for info, parsed in zip(
        unfolded, parallel_map(lambda o: _read_manifest_json(storage, o.key), unfolded), strict=True
    ):
        if parsed is not None:
            entry, counts = parsed
            state.entries[entry.shard_id], state.listed[entry.shard_id] = entry, info
            state.error_counts[entry.shard_id] = counts
            state.unfolded.append(entry.shard_id)
    return state


def count_errors(errors: pa.Table) -> ErrorCounts:
    """``{category: {reason: rows}}`` of an errors table."""
    counts: ErrorCounts = {}
    pairs = zip(errors.column("category").to_pylist(), errors.column("reason").to_pylist(), strict=True)
    for (category, reason), rows in Counter(pairs).items():
        counts.setdefault(category, {})[reason] = rows
    return counts


def shard_error_counts(storage: Storage, state: StageState) -> dict[str, ErrorCounts]:
    """Error counts of every shard of ``state``, reading the errors files only of shards without them."""
    known = {shard: counts for shard, counts in state.error_counts.items() if counts is not None}
    unknown = [shard for shard in state.entries if shard not in known]

    def read(shard: str) -> ErrorCounts:
        entry = state.entries[shard]
        if entry.error_rows == 0:
            return {}
        try:
            return count_errors(storage.read_parquet(entry.errors_key, columns=["category", "reason"]))
        except (StorageError, FileNotFoundError) as exc:  # damaged: the next rerun recomputes the shard
            logger.warning("%s shard %s: errors not counted: %s", state.stage, shard, exc)
            return {}

    known.update(zip(unknown, parallel_map(read, unknown), strict=True))
    return known


@dataclass(frozen=True)
class Compaction:
    stage: str
    folded: int  # manifests folded by this compaction
    parts: int  # valid index parts after it
    merged: bool
    objects_written: int


def _rows(state: StageState, shards: Iterable[str], counts: dict[str, ErrorCounts]) -> list[dict[str, Any]]:
    rows = []
    for shard in shards:
        row = state.entries[shard].model_dump()
        row["manifest_version"] = state.listed[shard].version
        row["error_counts"] = json.dumps(counts[shard], sort_keys=True)
        rows.append(row)
    return rows


def compact(storage: Storage, stage: str) -> Compaction:
    """Fold the stage's manifest JSONs that the index lacks (all but those of the newest write time)
    into a new index part, then commit it.

    The part is written first, then ``_index/_manifest.json`` naming it (both atomically): a crash
    between the two leaves a part nobody trusts. Past :data:`MAX_PARTS` parts, all rows of listed
    shards are merged into one part and the old parts are deleted after the commit (a reader that
    still holds the old list finds them gone and reads those shards' JSONs instead).
    """
    state = read_stage(storage, stage)
    newest = state.newest
    fold = sorted(
        s for s in state.unfolded if newest and state.listed[s].modified and state.listed[s].modified < newest
    )
    if not fold:
        return Compaction(stage, 0, len(state.parts), False, 0)
    counts = shard_error_counts(storage, state)
    merged = len(state.parts) + 1 > MAX_PARTS
    shards = sorted(set(state.entries) - set(state.unfolded) | set(fold)) if merged else fold
    table = pa.Table.from_pylist(_rows(state, shards, counts), schema=INDEX_SCHEMA)
    parts = [] if merged else list(state.parts)
    sequence = 1 + max((part["sequence"] for part in state.parts), default=0)
    key = f"{stage}/_index/part-{sequence:06d}-{uuid.uuid4().hex[:8]}.parquet"
    parts.append(
        {"key": key, "sha256": storage.write_parquet_atomic(key, table), "rows": len(table), "sequence": sequence}
    )
    storage.write_json_atomic(index_manifest_key(stage), {"version": INDEX_VERSION, "stage": stage, "parts": parts})
    if merged:
        for old in state.parts:
            try:
                storage.delete(old["key"])
            except StorageError as exc:  # unnamed by the index manifest: harmless, only space
                logger.warning("could not delete the merged index part %s: %s", old["key"], exc)
    logger.info("%s: folded %d manifests into %s (%d parts)", stage, len(fold), key, len(parts))
    return Compaction(stage, len(fold), len(parts), merged, 2)

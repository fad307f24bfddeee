"""Cross-shard dedup of crawled images: exact (sha256) and near-duplicate (64-bit pHash).

Runs after the crawl shards are committed, over the hash columns only (never the image bytes). The
decision is a pure function of the committed shards, so it is the same whatever order the shards were
crawled in, and the same whether computed at once or batch by batch:

* exact: among rows with one sha256, the first in (shard id, row) order stands for all of them;
* near: distinct pHashes within ``max_distance`` bits are linked (exactly, no cap: permuted sorted
  tables in ``pipeline/near_dup.py``), linked rows form clusters (connected components), and each
  cluster keeps its largest image (pixels, then bytes, then order). Every other row of the cluster,
  byte copies included, is dropped against that one representative: as ``duplicate_exact`` if it has
  the representative's sha256, else as ``near_duplicate``.

Dropped rows are recorded as crawl error rows (category ``filtered``) in ``crawl/_dedup/dropped.parquet``;
later stages skip them. Beside it, ``crawl/_dedup/index-<fingerprint>.parquet`` keeps one row per crawl
row (hash columns plus its cluster label), named by ``_manifest.json`` with the shard set it covers.
When new crawl shards arrive and the covered ones are unchanged, only the new rows are read and only
pairs involving a new pHash are searched; the old clusters enter as given. The index holds every row,
not only the kept ones: a new image may link to a dropped one, and the result must equal a computation
from scratch (a new, larger image can also take over a cluster's representative).
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.near_dup import components, near_edges
from ps3_engine.schemas import ERROR_SCHEMA

logger = logging.getLogger(__name__)

HASH_COLUMNS = ["item_id", "shard_id", "source_ref", "sha256", "phash", "width", "height", "num_bytes"]
INDEX_PREFIX = "crawl/_dedup/index-"
# One row per crawl row, in canonical (shard id, row) order; ``component`` is its cluster label.
INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("phash", pa.uint64(), nullable=False),
        pa.field("pixels", pa.int64(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("component", pa.int64(), nullable=False),
    ],
    metadata={"record_kind": "dedup_index", "schema_version": "1"},
)
READ_THREADS = 16
ROW_GROUP_ROWS = 1 << 20


@dataclass(frozen=True)
class DedupOutcome:
    fingerprint: str
    kept: int
    dropped_exact: int
    dropped_near: int
    recomputed: bool
    # Rows read from crawl shards this time (all of them from scratch, only new shards' incrementally).
    rows_read: int = 0
    incremental: bool = False


# -- the decision, on arrays ------------------------------------------------------------------------


def _seed_edges(node_of_row: np.ndarray, old_component: np.ndarray) -> np.ndarray:
    """Edges joining the nodes of each earlier cluster (a star per cluster label)."""
    old = old_component >= 0
    labels, nodes = old_component[old], node_of_row[old]
    order = np.lexsort((nodes, labels))
    labels, nodes = labels[order], nodes[order]
    head = np.r_[0, np.flatnonzero(labels[1:] != labels[:-1]) + 1]
    first = np.repeat(nodes[head], np.diff(np.r_[head, labels.size]))
    linked = first != nodes
    return np.stack([first[linked], nodes[linked]]).astype(np.int64)


def solve(
    digest_ids: np.ndarray,
    phash: np.ndarray,
    pixels: np.ndarray,
    num_bytes: np.ndarray,
    max_distance: int,
    old_component: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows given in canonical order and pick each cluster's representative.

    Args:
        digest_ids: ``int[n]`` sha256 ids numbered by first occurrence (0, 1, ...).
        phash, pixels, num_bytes: ``uint64[n]``, ``int64[n]``, ``int64[n]`` per row.
        max_distance: pHash Hamming distance that links two images.
        old_component: optional ``int64[n]`` cluster label from an earlier computation over a subset
            of the rows (-1 for rows it did not cover); only pairs involving a pHash it did not
            cover are searched. Labels must come from this same ``max_distance``.

    Returns:
        ``(kept_row, component)``: ``int64[n]`` the row each row is deduplicated against (itself when
        kept) and ``int64[n]`` its cluster label.
    """
    num_rows = digest_ids.size
    if num_rows == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, first_row = np.unique(digest_ids, return_index=True)
    node_values, node_of_digest = np.unique(phash[first_row], return_inverse=True)
    node_of_row = node_of_digest[digest_ids]
    is_new, seed = None, np.empty((2, 0), np.int64)
    if old_component is not None:
        is_new = np.ones(node_values.size, bool)
        is_new[node_of_row[old_component >= 0]] = False
        seed = _seed_edges(node_of_row, old_component)
    edges = np.concatenate([seed, near_edges(node_values, max_distance, is_new)], axis=1)
    digest_component = components(node_values.size, edges)[node_of_digest].astype(np.int64)
    # Representative: most pixels, then most bytes, then the earliest row.
    order = np.lexsort((first_row, -num_bytes[first_row], -pixels[first_row], digest_component))
    heads = order[np.r_[True, digest_component[order][1:] != digest_component[order][:-1]]]
    representative = np.empty(digest_component.max() + 1, np.int64)
    representative[digest_component[heads]] = first_row[heads]
    row_component = digest_component[digest_ids]
    return representative[row_component], row_component


def find_duplicates(rows: list[dict], max_distance: int) -> list[tuple[int, int, str, int]]:
    """Return ``(dropped_index, kept_index, reason, distance)`` for ``rows`` given in canonical order.

    A convenience over :func:`solve` for small row lists (tests, tools). Every dropped row points at the
    kept representative of its cluster (never at another dropped row); ``reason`` is ``duplicate_exact``
    when its sha256 equals the representative's, else ``near_duplicate``, and ``distance`` is the pHash
    distance to the representative.
    """
    digest_index: dict[str, int] = {}
    digest_ids = np.array([digest_index.setdefault(r["sha256"], len(digest_index)) for r in rows], np.int64)
    phash = np.array([r["phash"] for r in rows], np.uint64)
    pixels = np.array([r["width"] * r["height"] for r in rows], np.int64)
    num_bytes = np.array([r["num_bytes"] for r in rows], np.int64)
    kept_row, _ = solve(digest_ids, phash, pixels, num_bytes, max_distance)
    dropped = np.flatnonzero(kept_row != np.arange(len(rows)))
    kept = kept_row[dropped]
    exact = digest_ids[dropped] == digest_ids[kept]
    distance = np.bitwise_count(phash[dropped] ^ phash[kept])
    return [
        (int(d), int(k), "duplicate_exact" if e else "near_duplicate", int(h))
        for d, k, e, h in zip(dropped, kept, exact, distance, strict=True)
    ]


# -- reading and writing a run's dedup ----------------------------------------------------------------


def _fingerprint(shards: dict[str, str], max_distance: int) -> str:
    payload = {"max_distance": max_distance, "shards": shards}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def dedup_fingerprint(layout: RunLayout, max_distance: int) -> str:
    shards = {s: m.output_checksum for s, m in sorted(layout.manifests("crawl").items())}
    return _fingerprint(shards, max_distance)


def _read_shard(layout: RunLayout, shard_id: str) -> pa.Table:
    """One crawl shard's hash columns as index rows (component -1: not yet clustered)."""
    # ParquetFile.read on one thread: about twice as fast as read_table on crawl shards, whose 64-row
    # groups make per-row-group overhead dominate (the parallelism is across shards).
    storage = layout.storage
    with storage.filesystem.open_input_file(storage.path(layout.output_key("crawl", shard_id))) as handle:
        table = pq.ParquetFile(handle).read(columns=HASH_COLUMNS, use_threads=False)
    num = table.num_rows
    pixels = pc.multiply(table["width"].cast(pa.int64()), table["height"].cast(pa.int64()))
    columns = {
        "shard_id": table["shard_id"],
        "row": pa.array(np.arange(num, dtype=np.int32)),
        "item_id": table["item_id"],
        "source_ref": table["source_ref"],
        "sha256": table["sha256"],
        "phash": table["phash"],
        "pixels": pixels,
        "num_bytes": table["num_bytes"],
        "component": pa.array(np.full(num, -1, np.int64)),
    }
    return pa.table(columns).cast(INDEX_SCHEMA).combine_chunks()


def _read_shards(layout: RunLayout, shard_ids: list[str]) -> pa.Table:
    """The hash columns of ``shard_ids`` (in that order), read in parallel (object stores reward it)."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(lambda s: _read_shard(layout, s), shard_ids))
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _reusable_index(layout: RunLayout, previous: dict | None, shards: dict[str, str], max_distance: int) -> str | None:
    """The index key of an earlier dedup that covers a subset of today's unchanged shards, if any."""
    if not previous or previous.get("max_distance") != max_distance or "index_key" not in previous:
        return None
    covered = previous.get("shards", {})
    if any(shards.get(shard) != checksum for shard, checksum in covered.items()):
        return None
    return previous["index_key"] if layout.storage.exists(previous["index_key"]) else None


def _canonical(table: pa.Table, shard_ids: list[str]) -> pa.Table:
    """``table`` sorted by (shard id, row); a no-op when new shards sort after the indexed ones."""
    # Typed: with no committed shard (all failed) an untyped empty array is null-typed and index_in raises.
    value_set = pa.array(shard_ids, pa.string())
    rank = pc.index_in(table["shard_id"], value_set=value_set).to_numpy(zero_copy_only=False)
    key = rank.astype(np.int64) << 32 | table["row"].to_numpy().astype(np.int64)
    if key.size < 2 or bool(np.all(key[1:] > key[:-1])):
        return table
    return table.take(np.argsort(key, kind="stable"))


def _write_parquet(layout: RunLayout, key: str, table: pa.Table) -> None:
    """Commit a large table with large row groups (Storage's default of 64 rows suits image shards)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    layout.storage.write_bytes_atomic(key, memoryview(sink.getvalue()))


def _drop_table(index: pa.Table, kept_row: np.ndarray, phash: np.ndarray, exact: np.ndarray) -> pa.Table:
    """Error rows (``ERROR_SCHEMA``) for the dropped rows, built column-wise."""
    dropped = np.flatnonzero(kept_row != np.arange(kept_row.size))
    kept = kept_row[dropped]
    exact = exact[dropped]
    distance = pa.array(np.bitwise_count(phash[dropped] ^ phash[kept]).astype(np.int64)).cast(pa.string())
    reason = pc.if_else(pa.array(exact), "duplicate_exact", "near_duplicate")
    message = pc.binary_join_element_wise(
        pc.if_else(pa.array(exact), "duplicate exact of ", "near duplicate of "),
        index["source_ref"].take(kept),
        " (item ",
        index["item_id"].take(kept),
        ", pHash distance ",
        distance,
        ")",
        "",
    )
    num = dropped.size
    columns = {
        "item_id": index["item_id"].take(dropped),
        "stage": pa.array(["crawl"] * num, pa.string()),
        "shard_id": index["shard_id"].take(dropped),
        "input_ref": index["source_ref"].take(dropped),
        "category": pa.array(["filtered"] * num, pa.string()),
        "reason": reason,
        "transient": pa.array(np.zeros(num, bool)),
        "message": message,
        "attempts": pa.array(np.ones(num, np.int16)),
        "created_at": pa.array([datetime.now(UTC)] * num, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns).cast(ERROR_SCHEMA)


def run_dedup(layout: RunLayout, max_distance: int) -> DedupOutcome:
    """Compute (or reuse, or extend) the drop table for the run's committed crawl shards."""
    storage = layout.storage
    shards = {s: m.output_checksum for s, m in sorted(layout.manifests("crawl").items())}
    fingerprint = _fingerprint(shards, max_distance)
    previous = storage.read_json(layout.DEDUP_MANIFEST_KEY) if storage.exists(layout.DEDUP_MANIFEST_KEY) else None
    if previous and previous.get("fingerprint") == fingerprint and storage.exists(layout.DEDUP_KEY):
        return DedupOutcome(fingerprint, previous["kept"], previous["dropped_exact"], previous["dropped_near"], False)
    base_key = _reusable_index(layout, previous, shards, max_distance)
    covered = set(previous["shards"]) if base_key else set()
    new_shards = [s for s in shards if s not in covered]
    fresh = _read_shards(layout, new_shards)
    index = pa.concat_tables([storage.read_parquet(base_key).cast(INDEX_SCHEMA), fresh]) if base_key else fresh
    index = _canonical(index, list(shards))

    # One memo table across chunks: the indices number digests by first occurrence over the whole column.
    encoded = pc.dictionary_encode(index["sha256"]).chunks
    digest_ids = np.concatenate([np.empty(0, np.int32), *(chunk.indices.to_numpy() for chunk in encoded)])
    del encoded
    phash = index["phash"].to_numpy()
    old_component = index["component"].to_numpy() if base_key else None
    kept_row, component = solve(
        digest_ids, phash, index["pixels"].to_numpy(), index["num_bytes"].to_numpy(), max_distance, old_component
    )
    exact = digest_ids == digest_ids[kept_row]
    drops = _drop_table(index, kept_row, phash, exact)
    at = index.schema.get_field_index("component")
    index = index.set_column(at, INDEX_SCHEMA.field("component"), pa.array(component))

    index_key = f"{INDEX_PREFIX}{fingerprint}.parquet"
    _write_parquet(layout, index_key, index)
    _write_parquet(layout, layout.DEDUP_KEY, drops)
    dropped_exact = int(np.count_nonzero(exact & (kept_row != np.arange(kept_row.size))))
    outcome = DedupOutcome(
        fingerprint,
        kept=index.num_rows - drops.num_rows,
        dropped_exact=dropped_exact,
        dropped_near=drops.num_rows - dropped_exact,
        recomputed=True,
        rows_read=fresh.num_rows,
        incremental=base_key is not None,
    )
    # The manifest is written last: until it names the new index, a rerun trusts the old one.
    storage.write_json_atomic(
        layout.DEDUP_MANIFEST_KEY,
        {
            "fingerprint": fingerprint,
            "max_distance": max_distance,
            "shards": shards,
            "index_key": index_key,
            "kept": outcome.kept,
            "dropped_exact": outcome.dropped_exact,
            "dropped_near": outcome.dropped_near,
            "created_at": datetime.now(UTC).isoformat(),
        },
    )
    for obj in storage.list(INDEX_PREFIX.rsplit("/", 1)[0] + "/"):
        if obj.key.startswith(INDEX_PREFIX) and obj.key != index_key:
            storage.delete(obj.key)
    logger.info(
        "dedup: %d kept, %d exact and %d near duplicates dropped (%d rows read, %s)",
        outcome.kept,
        outcome.dropped_exact,
        outcome.dropped_near,
        outcome.rows_read,
        "incremental" if outcome.incremental else "from scratch",
    )
    return outcome

"""Cross-shard dedup of crawled images: exact (sha256) and near-duplicate (64-bit pHash).

Runs after every crawl shard is committed, over the hash columns only. The decision is a pure
function of the committed shards, so it is the same whatever order the shards were crawled in:

* exact: among rows with one sha256, the first in (shard id, row) order stands for all of them;
* near: pHashes within ``max_distance`` bits are linked (candidate pairs via LSH bands: with
  ``max_distance + 1`` bands, two hashes that close must agree exactly on at least one band), linked
  rows form clusters, and each cluster keeps its largest image (pixels, then bytes, then order).
  Every other row of the cluster, byte copies included, is dropped against that one representative:
  as ``duplicate_exact`` if it has the representative's sha256, else as ``near_duplicate``.

Dropped rows are recorded as crawl error rows (category ``filtered``) in ``crawl/_dedup/``; later stages
skip them. The result is fingerprinted by the crawl manifests it was computed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.schemas import ERROR_SCHEMA, rows_to_table
from ps3_engine.stages.imaging import hamming_distance

logger = logging.getLogger(__name__)

# Rows of one LSH bucket compared pairwise, at most (the comparisons grow quadratically with the bucket);
# rows past the cap in a bucket are only linked through their other bands, and a warning says so.
MAX_BUCKET_COMPARISONS = 2000
HASH_COLUMNS = ["item_id", "shard_id", "source_ref", "sha256", "phash", "width", "height", "num_bytes"]


@dataclass(frozen=True)
class DedupOutcome:
    fingerprint: str
    kept: int
    dropped_exact: int
    dropped_near: int
    recomputed: bool


def _band_keys(phash: int, num_bands: int) -> list[tuple[int, int]]:
    width = -(-64 // num_bands)
    mask = (1 << width) - 1
    return [(band, (phash >> (band * width)) & mask) for band in range(num_bands)]


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(rows: list[dict], max_distance: int) -> list[tuple[int, int, str, int]]:
    """Return ``(dropped_index, kept_index, reason, distance)`` for ``rows`` given in canonical order.

    Every dropped row points at the kept representative of its cluster (never at another dropped row);
    ``reason`` is ``duplicate_exact`` when its sha256 equals the representative's, else ``near_duplicate``,
    and ``distance`` is the pHash distance to the representative.
    """
    first_by_digest: dict[str, int] = {}
    unique: list[int] = []
    for index, row in enumerate(rows):
        if first_by_digest.setdefault(row["sha256"], index) == index:
            unique.append(index)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for position, index in enumerate(unique):
        for key in _band_keys(rows[index]["phash"], max_distance + 1):
            buckets[key].append(position)
    links = _UnionFind(len(unique))
    capped_sizes: list[int] = []
    for members in buckets.values():
        if len(members) > MAX_BUCKET_COMPARISONS:
            capped_sizes.append(len(members))
        head = members[:MAX_BUCKET_COMPARISONS]
        for i, a in enumerate(head):
            for b in head[i + 1 :]:
                if hamming_distance(rows[unique[a]]["phash"], rows[unique[b]]["phash"]) <= max_distance:
                    links.union(a, b)
    if capped_sizes:
        logger.warning(
            "dedup: %d LSH bucket(s) hold more than MAX_BUCKET_COMPARISONS=%d rows (largest: %d rows); "
            "%d bucket entries past the cap were not compared, so some near duplicates may be missed",
            len(capped_sizes),
            MAX_BUCKET_COMPARISONS,
            max(capped_sizes),
            sum(size - MAX_BUCKET_COMPARISONS for size in capped_sizes),
        )
    clusters: dict[int, list[int]] = defaultdict(list)
    for position in range(len(unique)):
        clusters[links.find(position)].append(unique[position])
    representative: dict[int, int] = {}
    for members in clusters.values():
        best = max(members, key=lambda i: (rows[i]["width"] * rows[i]["height"], rows[i]["num_bytes"], -i))
        representative.update(dict.fromkeys(members, best))
    drops: list[tuple[int, int, str, int]] = []
    for index, row in enumerate(rows):
        kept = representative[first_by_digest[row["sha256"]]]
        if kept == index:
            continue
        reason = "duplicate_exact" if row["sha256"] == rows[kept]["sha256"] else "near_duplicate"
        drops.append((index, kept, reason, hamming_distance(row["phash"], rows[kept]["phash"])))
    return drops


def dedup_fingerprint(layout: RunLayout, max_distance: int) -> str:
    manifests = layout.manifests("crawl")
    payload = {"max_distance": max_distance, "shards": {s: m.output_checksum for s, m in sorted(manifests.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def run_dedup(layout: RunLayout, max_distance: int) -> DedupOutcome:
    """Compute (or reuse) the drop table for the run's committed crawl shards."""
    fingerprint = dedup_fingerprint(layout, max_distance)
    storage = layout.storage
    if storage.exists(layout.DEDUP_MANIFEST_KEY) and storage.exists(layout.DEDUP_KEY):
        previous = storage.read_json(layout.DEDUP_MANIFEST_KEY)
        if previous.get("fingerprint") == fingerprint:
            return DedupOutcome(
                fingerprint, previous["kept"], previous["dropped_exact"], previous["dropped_near"], False
            )
    tables = [layout.read_output("crawl", shard, columns=HASH_COLUMNS) for shard in sorted(layout.manifests("crawl"))]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    drops = find_duplicates(rows, max_distance)
    now = datetime.now(UTC)
    error_rows = [
        {
            "item_id": rows[dropped]["item_id"],
            "stage": "crawl",
            "shard_id": rows[dropped]["shard_id"],
            "input_ref": rows[dropped]["source_ref"],
            "category": "filtered",
            "reason": reason,
            "transient": False,
            "message": f"{reason.replace('_', ' ')} of {rows[kept]['source_ref']} (item {rows[kept]['item_id']}, "
            f"pHash distance {distance})",
            "attempts": 1,
            "created_at": now,
        }
        for dropped, kept, reason, distance in drops
    ]
    storage.write_parquet_atomic(layout.DEDUP_KEY, rows_to_table(error_rows, ERROR_SCHEMA))
    exact = sum(1 for d in drops if d[2] == "duplicate_exact")
    outcome = DedupOutcome(fingerprint, len(rows) - len(drops), exact, len(drops) - exact, True)
    storage.write_json_atomic(
        layout.DEDUP_MANIFEST_KEY,
        {
            "fingerprint": fingerprint,
            "kept": outcome.kept,
            "dropped_exact": exact,
            "dropped_near": outcome.dropped_near,
            "created_at": now.isoformat(),
        },
    )
    logger.info("dedup: %d kept, %d exact and %d near duplicates dropped", outcome.kept, exact, outcome.dropped_near)
    return outcome

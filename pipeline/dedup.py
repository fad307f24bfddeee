"""Cross-shard dedup of crawled images by deterministic waves: exact (sha256) and near (64-bit pHash).

Runs over the hash columns of committed crawl shards (never the image bytes). Decisions are made wave
by wave and are final once made, so a streaming run can send a wave's kept images on to segment and
caption while the crawl goes on, and get the same drops as a stage-by-stage run.

Waves. Crawl shard ids are ``"<source prefix>-<index>"`` (``pipeline/sources.py``); a shard's wave key
is ``(prefix, index // crawl.dedup_wave_shards)``, fixed by the id alone, so wave membership never
depends on timing or on which shards committed. Rows are in canonical order: by wave, then shard
(prefix, numeric index), then row.

Decision of wave k, against every row of the waves decided before it:

* rows are linked when their pHashes are within ``max_distance`` bits or their sha256 are equal
  (exact: permuted sorted tables, ``pipeline/near_dup.py``, no cap, no missed pair);
* a connected component (over the rows of waves <= k) that holds an earlier row drops every new row
  in it against its primary representative: the best (most pixels, then most bytes, then earliest
  canonical position) of the component's earlier *kept* rows. Earlier rows never change status, so
  two earlier clusters bridged by a new row both stay kept, and a later, larger image never takes a
  cluster over. A new row near a dropped earlier one joins that one's cluster;
* a component of new rows only keeps its best row and drops the others against it;
* a drop is ``duplicate_exact`` when its sha256 equals its representative's, else ``near_duplicate``.

With one wave (``dedup_wave_shards`` >= every source's shard count, one source) this is the plain rule
"each cluster keeps its largest image".

Order of waves. Waves are decided in key order, with one exception that keeps old decisions final:
waves persisted by an earlier dedup whose fingerprint chain still matches the committed shards stay
first, in their decided order, and every other wave follows in key order. A source added later thus
makes new waves decided against the old ones (downstream work is never invalidated by new inputs),
while a run from scratch, or one whose first wave changed, is in plain key order.

Persistence. Each decided wave is ``crawl/_dedup/waves/<prefix>-<k:06d>.parquet``: one row per crawl
row (ids, hash columns, representative position, exact flag, pHash distance), with its chain
fingerprint (sha256 of the previous wave's fingerprint, its key, its shards' output checksums, the
distance, the wave size and the algorithm version) in the Parquet metadata. A rerun with unchanged
shards recomputes nothing; a changed shard in the wave at position j recomputes the waves from j on
(the earlier ones are read back, not recomputed from the crawl shards); obsolete wave files are
deleted. ``crawl/_dedup/dropped.parquet`` (crawl error rows, category ``filtered``, read by
``RunLayout.excluded_items``) and then ``crawl/_dedup/_manifest.json`` are written last.

Cost. :func:`run_dedup` searches near pairs once over all rows (edges ranked by the wave of their
later endpoint) and sweeps the waves with a union-find (``pipeline/dedup_sweep.py``): O(N log N) in
all, not per wave. :meth:`WaveDedup.decide` (the streaming path) costs O(N log N) per wave, N being
the rows decided so far. Memory: about 100 bytes per row of compact columns (sha256 as 32 bytes,
pHash, pixels, bytes, positions); item ids and references are read per wave, and held only for the
dropped rows and their representatives when the drop table is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ps3_engine.pipeline.dedup_sweep import (
    DedupState,
    digest_groups,
    shard_order_key,
    solve_waves,
    sorted_unique,
    wave_key,
)
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.schemas import ERROR_SCHEMA

logger = logging.getLogger(__name__)

__all__ = ["DedupOutcome", "WaveDedup", "find_duplicates", "run_dedup", "solve", "wave_key"]

HASH_COLUMNS = ["item_id", "shard_id", "source_ref", "sha256", "phash", "width", "height", "num_bytes"]
COMPACT_COLUMNS = ["sha256", "phash", "width", "height", "num_bytes"]
NAME_COLUMNS = ["item_id", "source_ref"]
DEDUP_PREFIX = "crawl/_dedup/"
WAVES_PREFIX = "crawl/_dedup/waves/"
# Bumped when the decision rule changes: persisted waves of another rule are then recomputed.
ALGORITHM = "waves-1"
META_KEY = b"ps3_dedup_wave"
ROOT = "root"
# One row per crawl row of the wave, in canonical order; ``position`` counts over all waves in order.
WAVE_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("row", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("sha256", pa.binary(32), nullable=False),
        pa.field("phash", pa.uint64(), nullable=False),
        pa.field("pixels", pa.int64(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        pa.field("representative", pa.int64(), nullable=False),
        pa.field("exact", pa.bool_(), nullable=False),
        pa.field("distance", pa.int8(), nullable=False),
    ],
    metadata={"record_kind": "dedup_wave", "schema_version": "1"},
)
READ_THREADS = 16
ROW_GROUP_ROWS = 1 << 20
DROP_CHUNK_ROWS = 1 << 20
_HEX = np.full(256, 255, np.uint8)
for _value, _char in enumerate(b"0123456789abcdef"):
    _HEX[_char] = _HEX[ord(chr(_char).upper())] = _value


@dataclass(frozen=True)
class DedupOutcome:
    fingerprint: str
    kept: int
    dropped_exact: int
    dropped_near: int
    recomputed: bool
    # Rows read from crawl shards this time (waves read back from their files are not counted).
    rows_read: int = 0
    # Some waves were reused and others computed.
    incremental: bool = False
    waves_computed: int = 0
    waves_reused: int = 0


# -- the decision on in-memory rows (tests, tools) ---------------------------------------------------


def solve(
    digest_ids: np.ndarray,
    phash: np.ndarray,
    pixels: np.ndarray,
    num_bytes: np.ndarray,
    max_distance: int,
    wave: np.ndarray | None = None,
) -> np.ndarray:
    """Representative row per row (itself when kept) for rows in canonical order.

    Args:
        digest_ids: ``int[n]`` sha256 ids (equal ids: byte copies).
        phash, pixels, num_bytes: ``uint64[n]``, ``int64[n]``, ``int64[n]`` per row.
        max_distance: pHash Hamming distance that links two images.
        wave: optional non-decreasing ``int[n]`` wave ordinal per row (default: one wave).
    """
    words = np.zeros((digest_ids.size, 4), np.uint64)
    words[:, 0] = digest_ids
    wave = np.zeros(digest_ids.size, np.int64) if wave is None else np.asarray(wave, np.int64)
    return solve_waves(words, np.asarray(phash, np.uint64), pixels, num_bytes, wave, max_distance)[0]


def find_duplicates(rows: list[dict], max_distance: int) -> list[tuple[int, int, str, int]]:
    """Return ``(dropped_index, kept_index, reason, distance)`` for ``rows`` given in canonical order.

    A convenience over :func:`solve` (one wave) for small row lists. Every dropped row points at the
    kept representative of its cluster; ``reason`` is ``duplicate_exact`` when its sha256 equals the
    representative's, else ``near_duplicate``; ``distance`` is the pHash distance to the representative.
    """
    digest_index: dict[str, int] = {}
    digest_ids = np.array([digest_index.setdefault(r["sha256"], len(digest_index)) for r in rows], np.int64)
    phash = np.array([r["phash"] for r in rows], np.uint64)
    pixels = np.array([r["width"] * r["height"] for r in rows], np.int64)
    num_bytes = np.array([r["num_bytes"] for r in rows], np.int64)
    kept_row = solve(digest_ids, phash, pixels, num_bytes, max_distance)
    dropped = np.flatnonzero(kept_row != np.arange(len(rows)))
    kept = kept_row[dropped]
    exact = digest_ids[dropped] == digest_ids[kept]
    distance = np.bitwise_count(phash[dropped] ^ phash[kept])
    return [
        (int(d), int(k), "duplicate_exact" if e else "near_duplicate", int(h))
        for d, k, e, h in zip(dropped, kept, exact, distance, strict=True)
    ]


# -- columns --------------------------------------------------------------------------------------


def sha_words(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """sha256 hex strings as ``uint64[n, 4]`` (the 32 digest bytes); other text is hashed to 32 bytes."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_binary(array.type):
        raw = np.frombuffer(array.buffers()[1], np.uint8)[array.offset * 32 : (array.offset + len(array)) * 32]
        return raw.reshape(-1, 32).copy().view(np.uint64)
    array = array.cast(pa.string())
    num = len(array)
    if num and array.null_count == 0:
        offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + num + 1]
        if np.all(np.diff(offsets) == 64):
            chars = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(num, 64)
            nibbles = _HEX[chars]
            if np.all(nibbles != 255):
                return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(np.uint64)
    # Not the crawl's hex digests (hand-made rows): any text still groups exactly by its own hash.
    raw = b"".join(hashlib.sha256(str(value).encode()).digest() for value in array.to_pylist())
    return np.frombuffer(raw, np.uint8).reshape(num, 32).copy().view(np.uint64)


def _words_to_binary(words: np.ndarray) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), words.shape[0], [None, pa.py_buffer(words.tobytes())])


@dataclass
class Compact:
    """Compact columns of rows in canonical order (about 64 bytes per row)."""

    sha_words: np.ndarray
    phash: np.ndarray
    pixels: np.ndarray
    num_bytes: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> Compact:
        pixels = table["pixels"] if "pixels" in table.column_names else None
        if pixels is None:
            pixels = pc.multiply(table["width"].cast(pa.int64()), table["height"].cast(pa.int64()))
        return cls(
            sha_words(table["sha256"]),
            table["phash"].to_numpy().astype(np.uint64, copy=False),
            pixels.to_numpy().astype(np.int64, copy=False),
            table["num_bytes"].to_numpy().astype(np.int64, copy=False),
        )

    @classmethod
    def concat(cls, parts: list[Compact]) -> Compact:
        if not parts:
            return cls(
                np.empty((0, 4), np.uint64), np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64)
            )
        return cls(
            *(
                np.concatenate([getattr(p, name) for p in parts])
                for name in ("sha_words", "phash", "pixels", "num_bytes")
            )
        )


# -- waves and their fingerprints -----------------------------------------------------------------


@dataclass
class Wave:
    """One wave: its key, committed shards (canonical order) with output checksums, chain fingerprints."""

    key: tuple[str, int]
    shards: dict[str, str]
    prev: str = ROOT
    fingerprint: str = ""
    first_row: int = 0
    num_rows: int = 0
    reused: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def file_key(self) -> str:
        return wave_file_key(self.key)


def wave_file_key(key: tuple[str, int]) -> str:
    return f"{WAVES_PREFIX}{key[0]}-{key[1]:06d}.parquet"


def chain_fingerprint(
    prev: str, key: tuple[str, int], shards: dict[str, str], max_distance: int, wave_shards: int
) -> str:
    payload = {
        "algorithm": ALGORITHM,
        "prev": prev,
        "key": list(key),
        "shards": shards,
        "max_distance": max_distance,
        "wave_shards": wave_shards,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _fingerprint(shards: dict[str, str], max_distance: int, wave_shards: int) -> str:
    payload = {"algorithm": ALGORITHM, "max_distance": max_distance, "wave_shards": wave_shards, "shards": shards}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def dedup_fingerprint(layout: RunLayout, max_distance: int, wave_shards: int = 64) -> str:
    shards = {s: m.output_checksum for s, m in sorted(layout.manifests("crawl").items())}
    return _fingerprint(shards, max_distance, wave_shards)


def group_waves(shards: dict[str, str], wave_shards: int) -> dict[tuple[str, int], dict[str, str]]:
    """Committed shards by wave key, each wave's shards in canonical order."""
    waves: dict[tuple[str, int], dict[str, str]] = {}
    for shard_id in sorted(shards, key=shard_order_key_checked):
        waves.setdefault(wave_key(shard_id, wave_shards), {})[shard_id] = shards[shard_id]
    return waves


def shard_order_key_checked(shard_id: str) -> tuple[str, int]:
    wave_key(shard_id, 1)  # raises a clear ValueError for an id that is not "<prefix>-<index>"
    return shard_order_key(shard_id)


def _read_wave_meta(layout: RunLayout, key: str) -> dict | None:
    storage = layout.storage
    try:
        with storage.filesystem.open_input_file(storage.path(key)) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return json.loads(metadata[META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        # A damaged wave file is recomputed, not trusted (it was written atomically, so this is rare).
        logger.warning("dedup wave %s is unreadable (%s): it will be recomputed", storage.uri(key), exc)
        return None


def persisted_chain(
    layout: RunLayout, current: dict[tuple[str, int], dict[str, str]], max_distance: int, wave_shards: int
) -> list[Wave]:
    """The longest chain of persisted waves that still matches the committed shards, in decided order."""
    keys = [obj.key for obj in layout.storage.list(WAVES_PREFIX) if obj.key.endswith(".parquet")]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        metas = [m for m in pool.map(lambda k: _read_wave_meta(layout, k), keys) if m is not None]
    by_prev: dict[str, list[dict]] = {}
    for meta in metas:
        by_prev.setdefault(meta["prev"], []).append(meta)
    chain: list[Wave] = []
    prev, first_row, seen = ROOT, 0, set()
    while True:
        valid = []
        for meta in by_prev.get(prev, []):
            key = (meta["key"][0], int(meta["key"][1]))
            shards = current.get(key)
            if key in seen or shards is None or meta["shards"] != shards or meta["first_row"] != first_row:
                continue
            if meta["fingerprint"] == chain_fingerprint(prev, key, shards, max_distance, wave_shards):
                valid.append((key, meta))
        if not valid:
            return chain
        key, meta = min(valid, key=lambda pair: pair[0])
        chain.append(Wave(key, current[key], prev, meta["fingerprint"], first_row, meta["rows"], True, meta))
        prev, first_row = meta["fingerprint"], first_row + meta["rows"]
        seen.add(key)


# -- reading and writing --------------------------------------------------------------------------


def _read_shard(layout: RunLayout, shard_id: str, columns: list[str]) -> pa.Table:
    # ParquetFile.read on one thread: crawl shards' 64-row groups make per-row-group overhead dominate
    # read_table's parallelism (the parallelism is across shards).
    storage = layout.storage
    with storage.filesystem.open_input_file(storage.path(layout.output_key("crawl", shard_id))) as handle:
        return pq.ParquetFile(handle).read(columns=columns, use_threads=False)


def _read_wave_file(layout: RunLayout, wave: Wave, columns: list[str]) -> pa.Table:
    storage = layout.storage
    with storage.filesystem.open_input_file(storage.path(wave.file_key)) as handle:
        return pq.ParquetFile(handle).read(columns=columns)


def _read_compact(layout: RunLayout, waves: list[Wave]) -> tuple[Compact, np.ndarray, list[int], int]:
    """Compact columns of all rows of ``waves`` (wave files for reused ones, crawl shards otherwise).

    Returns ``(compact, persisted representative or -1 per row, rows per wave, rows read from shards)``.
    """

    def read(job: tuple[int, str | None]) -> tuple[Compact, np.ndarray]:
        index, shard_id = job
        if shard_id is None:
            columns = ["sha256", "phash", "pixels", "num_bytes", "representative"]
            table = _read_wave_file(layout, waves[index], columns)
            return Compact.of(table), table["representative"].to_numpy()
        table = _read_shard(layout, shard_id, COMPACT_COLUMNS)
        return Compact.of(table), np.full(table.num_rows, -1, np.int64)

    jobs = [
        (i, None) if w.reused else (i, s) for i, w in enumerate(waves) for s in (w.shards if not w.reused else [None])
    ]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        parts = list(pool.map(read, jobs))
    counts = [0] * len(waves)
    rows_read = 0
    for (index, shard_id), (compact, _) in zip(jobs, parts, strict=True):
        counts[index] += compact.phash.size
        rows_read += compact.phash.size if shard_id is not None else 0
    persisted = np.concatenate([np.empty(0, np.int64), *(p[1] for p in parts)])
    return Compact.concat([p[0] for p in parts]), persisted, counts, rows_read


def _read_names(layout: RunLayout, wave: Wave) -> list[pa.Table]:
    """``item_id`` and ``source_ref`` of each of the wave's shards."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(lambda s: _read_shard(layout, s, NAME_COLUMNS), wave.shards))


def _wave_table(
    wave: Wave,
    names: list[pa.Table],
    compact: Compact,
    representative: np.ndarray,
    group: np.ndarray,
    phash: np.ndarray,
) -> pa.Table:
    """The wave's rows with their decisions.

    ``names``: per shard, its ``item_id``/``source_ref``; ``compact``: the wave's rows; the other
    arrays cover every row position (representatives may lie in earlier waves).
    """
    lo, hi = wave.first_row, wave.first_row + wave.num_rows
    shard_ids = [s for s, t in zip(wave.shards, names, strict=True) for _ in range(t.num_rows)]
    rows = np.concatenate([np.empty(0, np.int32), *(np.arange(t.num_rows, dtype=np.int32) for t in names)])
    reps = representative[lo:hi]
    columns = {
        "shard_id": pa.array(shard_ids, pa.string()),
        "row": pa.array(rows),
        "item_id": pa.chunked_array([t["item_id"] for t in names], pa.string()).combine_chunks(),
        "source_ref": pa.chunked_array([t["source_ref"] for t in names], pa.string()).combine_chunks(),
        "sha256": _words_to_binary(compact.sha_words),
        "phash": pa.array(compact.phash),
        "pixels": pa.array(compact.pixels),
        "num_bytes": pa.array(compact.num_bytes),
        "position": pa.array(np.arange(lo, hi, dtype=np.int64)),
        "representative": pa.array(reps),
        "exact": pa.array(group[lo:hi] == group[reps]),
        "distance": pa.array(np.bitwise_count(phash[lo:hi] ^ phash[reps]).astype(np.int8)),
    }
    return pa.table(columns, schema=WAVE_SCHEMA)


def _write_parquet(layout: RunLayout, key: str, table: pa.Table) -> None:
    """Commit a large table with large row groups (Storage's default of 64 rows suits image shards)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    layout.storage.write_bytes_atomic(key, memoryview(sink.getvalue()))


def _write_wave(layout: RunLayout, wave: Wave, table: pa.Table, max_distance: int, wave_shards: int) -> None:
    dropped = table["representative"].to_numpy() != table["position"].to_numpy()
    exact = table["exact"].to_numpy() & dropped
    wave.meta = {
        "key": list(wave.key),
        "prev": wave.prev,
        "fingerprint": wave.fingerprint,
        "shards": wave.shards,
        "first_row": wave.first_row,
        "rows": wave.num_rows,
        "kept": int(np.count_nonzero(~dropped)),
        "dropped_exact": int(np.count_nonzero(exact)),
        "dropped_near": int(np.count_nonzero(dropped & ~exact)),
        "max_distance": max_distance,
        "wave_shards": wave_shards,
        "algorithm": ALGORITHM,
        "created_at": datetime.now(UTC).isoformat(),
    }
    metadata = {**(table.schema.metadata or {}), META_KEY: json.dumps(wave.meta).encode()}
    _write_parquet(layout, wave.file_key, table.replace_schema_metadata(metadata))


class _DropRows:
    """Collects the strings of dropped rows and of their representatives, wave by wave, in order."""

    def __init__(self, dropped: np.ndarray, representative: np.ndarray) -> None:
        self.dropped = dropped  # sorted positions
        self.reps = sorted_unique(representative[dropped])
        self.rep_of_dropped = representative[dropped]
        self.parts: dict[str, list[pa.Array]] = {"shard_id": [], "item_id": [], "source_ref": [], "created_at": []}
        self.rep_parts: dict[str, list[pa.Array]] = {"item_id": [], "source_ref": []}

    def take(self, table: pa.Table, first_row: int, created_at: str) -> None:
        """Keep what is needed from one wave's table (its rows start at position ``first_row``)."""
        hi = first_row + table.num_rows
        mine = self.dropped[np.searchsorted(self.dropped, first_row) : np.searchsorted(self.dropped, hi)] - first_row
        for name in ("shard_id", "item_id", "source_ref"):
            self.parts[name].append(table[name].take(mine).combine_chunks())
        stamp = pa.array([datetime.fromisoformat(created_at)] * mine.size, pa.timestamp("us", tz="UTC"))
        self.parts["created_at"].append(stamp)
        reps = self.reps[np.searchsorted(self.reps, first_row) : np.searchsorted(self.reps, hi)] - first_row
        for name in ("item_id", "source_ref"):
            self.rep_parts[name].append(table[name].take(reps).combine_chunks())

    def table(self, exact: np.ndarray, distance: np.ndarray) -> pa.Table:
        """ERROR_SCHEMA rows of all dropped rows (``exact``/``distance`` per dropped row)."""
        own = {name: pa.concat_arrays(parts or [pa.array([], pa.string())]) for name, parts in self.parts.items()}
        rep = {name: pa.concat_arrays(parts or [pa.array([], pa.string())]) for name, parts in self.rep_parts.items()}
        at = np.searchsorted(self.reps, self.rep_of_dropped)
        num = self.dropped.size
        exact_arrow = pa.array(exact)
        message = pc.binary_join_element_wise(
            pc.if_else(exact_arrow, "duplicate exact of ", "near duplicate of "),
            rep["source_ref"].take(at),
            " (item ",
            rep["item_id"].take(at),
            ", pHash distance ",
            pa.array(distance.astype(np.int64)).cast(pa.string()),
            ")",
            "",
        )
        columns = {
            "item_id": own["item_id"],
            "stage": pa.array(["crawl"] * num, pa.string()),
            "shard_id": own["shard_id"],
            "input_ref": own["source_ref"],
            "category": pa.array(["filtered"] * num, pa.string()),
            "reason": pc.if_else(exact_arrow, "duplicate_exact", "near_duplicate"),
            "transient": pa.array(np.zeros(num, bool)),
            "message": message,
            "attempts": pa.array(np.ones(num, np.int16)),
            "created_at": own["created_at"] if num else pa.array([], pa.timestamp("us", tz="UTC")),
        }
        return pa.table(columns).cast(ERROR_SCHEMA)


# -- the stage-by-stage path ------------------------------------------------------------------------


def _committed(layout: RunLayout) -> dict[str, str]:
    return {s: m.output_checksum for s, m in sorted(layout.manifests("crawl").items())}


def _ordered_waves(layout: RunLayout, shards: dict[str, str], max_distance: int, wave_shards: int) -> list[Wave]:
    """The persisted valid chain first (decided order), then every other wave in key order."""
    current = group_waves(shards, wave_shards)
    chain = persisted_chain(layout, current, max_distance, wave_shards)
    done = {w.key for w in chain}
    return chain + [Wave(key, current[key]) for key in sorted(current) if key not in done]


def _slice(compact: Compact, lo: int, hi: int) -> Compact:
    return Compact(compact.sha_words[lo:hi], compact.phash[lo:hi], compact.pixels[lo:hi], compact.num_bytes[lo:hi])


def run_dedup(layout: RunLayout, max_distance: int, wave_shards: int = 64) -> DedupOutcome:
    """Decide every wave of the run's committed crawl shards, reusing persisted waves whose chain holds.

    Writes the waves it computes, then ``crawl/_dedup/dropped.parquet`` and last the dedup manifest.

    Raises:
        ValueError: a committed crawl shard id is not ``"<prefix>-<index>"``.
    """
    storage = layout.storage
    shards = _committed(layout)
    fingerprint = _fingerprint(shards, max_distance, wave_shards)
    previous = storage.read_json(layout.DEDUP_MANIFEST_KEY) if storage.exists(layout.DEDUP_MANIFEST_KEY) else None
    if previous and previous.get("fingerprint") == fingerprint and storage.exists(layout.DEDUP_KEY):
        counts = (previous["kept"], previous["dropped_exact"], previous["dropped_near"])
        return DedupOutcome(fingerprint, *counts, recomputed=False, waves_reused=previous.get("waves", 0))
    waves = _ordered_waves(layout, shards, max_distance, wave_shards)
    compact, persisted, counts, rows_read = _read_compact(layout, waves)
    prev, first_row = ROOT, 0
    for wave, count in zip(waves, counts, strict=True):
        if not wave.reused:
            wave.prev, wave.fingerprint = (
                prev,
                chain_fingerprint(prev, wave.key, wave.shards, max_distance, wave_shards),
            )
        wave.first_row, wave.num_rows = first_row, count
        prev, first_row = wave.fingerprint, first_row + count
    computed = [w for w in waves if not w.reused]
    wave_of_row = np.repeat(np.arange(len(waves), dtype=np.int64), counts)
    if computed:
        state = DedupState.from_waves(
            compact.sha_words, compact.phash, compact.pixels, compact.num_bytes, wave_of_row, max_distance
        )
        representative, group = state.representative, state.group
        del state
        reused = persisted >= 0
        # Internal invariant: the persisted decisions are a function of what their chain fingerprints cover.
        assert np.array_equal(representative[reused], persisted[reused]), "persisted dedup waves disagree"
    else:
        representative, group = persisted, digest_groups(compact.sha_words)[0]
    outcome = _write_waves_and_drops(layout, waves, compact, representative, group, max_distance, wave_shards)
    outcome = DedupOutcome(
        fingerprint,
        *outcome,
        recomputed=bool(computed),
        rows_read=rows_read,
        incremental=bool(computed) and len(computed) < len(waves),
        waves_computed=len(computed),
        waves_reused=len(waves) - len(computed),
    )
    # The manifest is written last: until it names this fingerprint, a rerun recomputes.
    storage.write_json_atomic(
        layout.DEDUP_MANIFEST_KEY,
        {
            "fingerprint": fingerprint,
            "algorithm": ALGORITHM,
            "max_distance": max_distance,
            "wave_shards": wave_shards,
            "shards": len(shards),
            "waves": len(waves),
            "last_wave_fingerprint": waves[-1].fingerprint if waves else ROOT,
            "kept": outcome.kept,
            "dropped_exact": outcome.dropped_exact,
            "dropped_near": outcome.dropped_near,
            "created_at": datetime.now(UTC).isoformat(),
        },
    )
    _delete_obsolete(layout, {w.file_key for w in waves})
    logger.info(
        "dedup: %d kept, %d exact and %d near duplicates dropped (%d waves computed, %d reused, %d rows read)",
        outcome.kept,
        outcome.dropped_exact,
        outcome.dropped_near,
        outcome.waves_computed,
        outcome.waves_reused,
        outcome.rows_read,
    )
    return outcome


def _write_waves_and_drops(
    layout: RunLayout,
    waves: list[Wave],
    compact: Compact,
    representative: np.ndarray,
    group: np.ndarray,
    max_distance: int,
    wave_shards: int,
) -> tuple[int, int, int]:
    """Write the computed waves' files and the drop table; ``(kept, dropped_exact, dropped_near)``."""
    dropped = np.flatnonzero(representative != np.arange(representative.size))
    drops = _DropRows(dropped, representative)
    for wave in waves:
        if wave.reused:
            table = _read_wave_file(layout, wave, ["shard_id", "item_id", "source_ref"])
        else:
            lo, hi = wave.first_row, wave.first_row + wave.num_rows
            names = _read_names(layout, wave)
            table = _wave_table(wave, names, _slice(compact, lo, hi), representative, group, compact.phash)
            _write_wave(layout, wave, table, max_distance, wave_shards)
        drops.take(table, wave.first_row, wave.meta["created_at"])
    kept_of_dropped = representative[dropped]
    exact = group[dropped] == group[kept_of_dropped]
    distance = np.bitwise_count(compact.phash[dropped] ^ compact.phash[kept_of_dropped])
    _write_parquet(layout, layout.DEDUP_KEY, drops.table(exact, distance))
    num_exact = int(np.count_nonzero(exact))
    return representative.size - dropped.size, num_exact, dropped.size - num_exact


def _delete_obsolete(layout: RunLayout, live: set[str]) -> None:
    """Wave files outside the current chain, and per-row indexes of the pre-wave dedup."""
    for obj in layout.storage.list(DEDUP_PREFIX):
        obsolete_wave = obj.key.startswith(WAVES_PREFIX) and obj.key not in live
        legacy_index = obj.key.startswith(f"{DEDUP_PREFIX}index-")
        if obsolete_wave or legacy_index:
            layout.storage.delete(obj.key)


# -- the streaming path ----------------------------------------------------------------------------


class WaveDedup:
    """In-memory state of decided waves for one run; persists each decided wave.

    The streaming run calls :meth:`decide` once per wave, in key order, as each wave's crawl shards
    commit; :func:`run_dedup` later finds every wave persisted and only writes the drop table. The
    state holds about 100 bytes per decided row.
    """

    def __init__(self, layout: RunLayout, max_distance: int, wave_shards: int) -> None:
        self.layout = layout
        self.max_distance = max_distance
        self.wave_shards = wave_shards
        self._state: DedupState | None = None
        self._waves: dict[tuple[str, int], Wave] = {}
        self._last: Wave | None = None
        self._undecided: set[tuple[str, int]] = set()

    def _load(self) -> DedupState:
        """Read the persisted waves whose chain matches the committed shards and rebuild their state."""
        shards = _committed(self.layout)
        current = group_waves(shards, self.wave_shards)
        chain = persisted_chain(self.layout, current, self.max_distance, self.wave_shards)
        compact, persisted, counts, _ = _read_compact(self.layout, chain)
        wave_of_row = np.repeat(np.arange(len(chain), dtype=np.int64), counts)
        state = DedupState.from_waves(
            compact.sha_words, compact.phash, compact.pixels, compact.num_bytes, wave_of_row, self.max_distance
        )
        assert np.array_equal(state.representative, persisted), "persisted dedup waves disagree"
        self._waves = {w.key: w for w in chain}
        self._last = chain[-1] if chain else None
        self._undecided = set(current) - set(self._waves)
        logger.info("dedup: %d persisted waves (%d rows) reused", len(chain), state.num_rows)
        return state

    def decide(self, shard_ids: list[str]) -> dict[str, tuple[str, ...]]:
        """Decide the wave made of ``shard_ids`` (committed crawl shards of one wave) and persist it.

        Returns ``{shard_id: sorted tuple of dropped item ids}`` for every given shard. A wave already
        decided with the same shards returns its persisted decision.

        Raises:
            ValueError: the shards span several waves or are not committed; an earlier wave with
                committed shards is undecided; the wave was decided with other shards.
        """
        if not shard_ids:
            return {}
        keys = {wave_key(s, self.wave_shards) for s in shard_ids}
        if len(keys) != 1:
            raise ValueError(
                f"dedup decides one wave at a time; shards {sorted(shard_ids)[:4]} span waves {sorted(keys)}"
            )
        key = keys.pop()
        if self._state is None:
            self._state = self._load()
        shards = self._checksums(shard_ids)
        if key in self._waves:
            wave = self._waves[key]
            if wave.shards != shards:
                raise ValueError(
                    f"dedup wave {key[0]}-{key[1]} was decided with shards {sorted(wave.shards)[:4]}..., "
                    f"now asked with {sorted(shards)[:4]}...: rerun the crawl's dedup (run_dedup) to recompute it"
                )
            table = _read_wave_file(self.layout, wave, ["shard_id", "item_id", "position", "representative"])
            return self._drops_by_shard(table, shard_ids)
        earlier = sorted(k for k in self._undecided if k < key)
        if earlier:
            raise ValueError(
                f"dedup wave {key[0]}-{key[1]} comes after undecided wave(s) {earlier[:3]}: decide those first"
            )
        prev = self._last.fingerprint if self._last else ROOT
        fingerprint = chain_fingerprint(prev, key, shards, self.max_distance, self.wave_shards)
        wave = Wave(key, shards, prev, fingerprint, first_row=self._state.num_rows)
        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(lambda s: _read_shard(self.layout, s, HASH_COLUMNS), shards))
        compact = Compact.concat([Compact.of(t) for t in tables])
        wave.num_rows = compact.phash.size
        self._state.add_wave(compact.sha_words, compact.phash, compact.pixels, compact.num_bytes)
        state = self._state
        table = _wave_table(wave, tables, compact, state.representative, state.group, state.phash)
        _write_wave(self.layout, wave, table, self.max_distance, self.wave_shards)
        self._waves[key], self._last = wave, wave
        self._undecided.discard(key)
        return self._drops_by_shard(table, shard_ids)

    def _checksums(self, shard_ids: list[str]) -> dict[str, str]:
        entries = {s: self.layout.read_manifest("crawl", s) for s in sorted(shard_ids, key=shard_order_key)}
        missing = [s for s, entry in entries.items() if entry is None]
        if missing:
            raise ValueError(f"dedup needs committed crawl shards; {missing[:4]} have no manifest")
        return {s: entry.output_checksum for s, entry in entries.items() if entry is not None}

    @staticmethod
    def _drops_by_shard(table: pa.Table, shard_ids: list[str]) -> dict[str, tuple[str, ...]]:
        dropped = table.filter(pc.not_equal(table["position"], table["representative"]))
        found: dict[str, list[str]] = {s: [] for s in shard_ids}
        for shard_id, item_id in zip(dropped["shard_id"].to_pylist(), dropped["item_id"].to_pylist(), strict=True):
            found[shard_id].append(item_id)
        return {s: tuple(sorted(items)) for s, items in found.items()}

"""Storage of the dedup waves: compact columns, wave files and their fingerprint chain, the drop table.

See :mod:`ps3_engine.pipeline.dedup` for the semantics. A wave file is
``crawl/_dedup/waves/<prefix>-<k:06d>.parquet`` (one row per crawl row of the wave, canonical order)
with its chain entry (key, previous and own fingerprint, shards with their output checksums, first row
position, counts) as JSON under the Parquet metadata key ``ps3_dedup_wave``.
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

from ps3_engine.pipeline.dedup_sweep import shard_order_key, sorted_unique, wave_key
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.schemas import ERROR_SCHEMA

logger = logging.getLogger(__name__)

HASH_COLUMNS = ["item_id", "shard_id", "source_ref", "sha256", "phash", "width", "height", "num_bytes"]
COMPACT_COLUMNS = ["sha256", "phash", "width", "height", "num_bytes"]
NAME_COLUMNS = ["item_id", "source_ref"]
DEDUP_PREFIX = "crawl/_dedup/"
# The links that formed the components of the decided waves (see write_links).
LINKS_KEY = "crawl/_dedup/links.parquet"
LINKS_META_KEY = b"ps3_dedup_links"
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
_HEX = np.full(256, 255, np.uint8)
for _value, _char in enumerate(b"0123456789abcdef"):
    _HEX[_char] = _HEX[ord(chr(_char).upper())] = _value


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
    def empty(cls, num_rows: int) -> Compact:
        return cls(
            np.empty((num_rows, 4), np.uint64),
            np.empty(num_rows, np.uint64),
            np.empty(num_rows, np.int64),
            np.empty(num_rows, np.int64),
        )

    def fill(self, start: int, table: pa.Table) -> None:
        """Write ``table``'s rows (crawl or wave columns) at ``start``."""
        stop = start + table.num_rows
        self.sha_words[start:stop] = sha_words(table["sha256"])
        self.phash[start:stop] = table["phash"].to_numpy()
        if "pixels" in table.column_names:
            self.pixels[start:stop] = table["pixels"].to_numpy()
        else:
            self.pixels[start:stop] = table["width"].to_numpy().astype(np.int64) * table["height"].to_numpy()
        self.num_bytes[start:stop] = table["num_bytes"].to_numpy()

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


def read_shard(layout: RunLayout, shard_id: str, columns: list[str]) -> pa.Table:
    # ParquetFile.read on one thread: crawl shards' 64-row groups make per-row-group overhead dominate
    # read_table's parallelism (the parallelism is across shards).
    storage = layout.storage
    with storage.filesystem.open_input_file(storage.path(layout.output_key("crawl", shard_id))) as handle:
        return pq.ParquetFile(handle).read(columns=columns, use_threads=False)


def read_wave_file(layout: RunLayout, wave: Wave, columns: list[str]) -> pa.Table:
    storage = layout.storage
    with storage.filesystem.open_input_file(storage.path(wave.file_key)) as handle:
        return pq.ParquetFile(handle).read(columns=columns)


def read_compact(
    layout: RunLayout, waves: list[Wave], shard_rows: dict[str, int]
) -> tuple[Compact, np.ndarray, list[int], int]:
    """Compact columns of all rows of ``waves`` (wave files for reused ones, crawl shards otherwise).

    Each read fills its slice of preallocated arrays (rows known from the crawl manifests and the
    wave metadata), so the columns are never held twice. Returns ``(compact, persisted representative
    or -1 per row, rows per wave, rows read from crawl shards)``.

    Raises:
        ValueError: a file holds another number of rows than its manifest or wave metadata says.
    """
    jobs: list[tuple[int, str | None, int, int]] = []
    start = 0
    for index, wave in enumerate(waves):
        sources = [(None, int(wave.meta["rows"]))] if wave.reused else [(s, shard_rows[s]) for s in wave.shards]
        for shard_id, count in sources:
            jobs.append((index, shard_id, start, count))
            start += count
    out = Compact.empty(start)
    persisted = np.full(start, -1, np.int64)

    def read(job: tuple[int, str | None, int, int]) -> None:
        index, shard_id, lo, count = job
        if shard_id is None:
            columns = ["sha256", "phash", "pixels", "num_bytes", "representative"]
            table, name = read_wave_file(layout, waves[index], columns), waves[index].file_key
        else:
            table, name = read_shard(layout, shard_id, COMPACT_COLUMNS), layout.output_key("crawl", shard_id)
        if table.num_rows != count:
            raise ValueError(f"{layout.storage.uri(name)} has {table.num_rows} rows, its record says {count}")
        out.fill(lo, table)
        if shard_id is None:
            persisted[lo : lo + count] = table["representative"].to_numpy()

    with ThreadPoolExecutor(READ_THREADS) as pool:
        list(pool.map(read, jobs))
    # Arrow's allocator keeps freed decode buffers for reuse; the dedup will not read much more.
    pa.default_memory_pool().release_unused()
    counts = [0] * len(waves)
    for index, _, _, count in jobs:
        counts[index] += count
    rows_read = sum(count for _, shard_id, _, count in jobs if shard_id is not None)
    return out, persisted, counts, rows_read


def read_names(layout: RunLayout, wave: Wave) -> list[pa.Table]:
    """``item_id`` and ``source_ref`` of each of the wave's shards."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(lambda s: read_shard(layout, s, NAME_COLUMNS), wave.shards))


def wave_table(
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
    # pa.repeat per shard: a Python list of one id per row cost ~2 s per million rows.
    shard_ids = [pa.repeat(pa.scalar(s, pa.string()), t.num_rows) for s, t in zip(wave.shards, names, strict=True)]
    rows = np.concatenate([np.empty(0, np.int32), *(np.arange(t.num_rows, dtype=np.int32) for t in names)])
    reps = representative[lo:hi]
    columns = {
        "shard_id": pa.concat_arrays([pa.array([], pa.string()), *shard_ids]),
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


def write_parquet(layout: RunLayout, key: str, table: pa.Table) -> None:
    """Commit a large table with large row groups (Storage's default of 64 rows suits image shards)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    layout.storage.write_bytes_atomic(key, memoryview(sink.getvalue()))


def write_wave(layout: RunLayout, wave: Wave, table: pa.Table, max_distance: int, wave_shards: int) -> None:
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
    write_parquet(layout, wave.file_key, table.replace_schema_metadata(metadata))


def write_links(layout: RunLayout, links: np.ndarray, link_wave: np.ndarray, waves: list[Wave]) -> None:
    """Persist the links that formed the dedup components of ``waves`` (the chain, in decided order).

    With them a later dedup rebuilds the state after any unchanged prefix of the chain without
    searching its pairs again (:meth:`~ps3_engine.pipeline.dedup_sweep.DedupState.from_decided`).
    """
    meta = {"algorithm": ALGORITHM, "chain": [w.fingerprint for w in waves], "rows": [w.num_rows for w in waves]}
    table = pa.table(
        {
            "a": pa.array(links[:, 0], pa.int64()),
            "b": pa.array(links[:, 1], pa.int64()),
            "wave": pa.array(link_wave, pa.int64()),
        }
    )
    write_parquet(layout, LINKS_KEY, table.replace_schema_metadata({LINKS_META_KEY: json.dumps(meta).encode()}))


def read_links(layout: RunLayout, prefix: list[Wave]) -> tuple[np.ndarray, np.ndarray] | None:
    """The persisted links of the waves of ``prefix`` when the file's chain starts with it, else None."""
    storage = layout.storage
    if not prefix or not storage.exists(LINKS_KEY):
        return None
    try:
        with storage.filesystem.open_input_file(storage.path(LINKS_KEY)) as handle:
            parquet = pq.ParquetFile(handle)
            meta = json.loads((parquet.schema_arrow.metadata or {})[LINKS_META_KEY])
            chain = [w.fingerprint for w in prefix]
            if meta.get("algorithm") != ALGORITHM or meta["chain"][: len(chain)] != chain:
                return None
            table = parquet.read()
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        logger.warning("dedup links %s are unreadable (%s): recomputing", storage.uri(LINKS_KEY), exc)
        return None
    table = table.filter(pc.less(table["wave"], len(prefix)))
    return np.stack([table["a"].to_numpy(), table["b"].to_numpy()], axis=1), table["wave"].to_numpy()


class DropRows:
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
        stamp = pa.repeat(pa.scalar(datetime.fromisoformat(created_at), pa.timestamp("us", tz="UTC")), mine.size)
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
            "stage": pa.repeat(pa.scalar("crawl", pa.string()), num),
            "shard_id": own["shard_id"],
            "input_ref": own["source_ref"],
            "category": pa.repeat(pa.scalar("filtered", pa.string()), num),
            "reason": pc.if_else(exact_arrow, "duplicate_exact", "near_duplicate"),
            "transient": pa.array(np.zeros(num, bool)),
            "message": message,
            "attempts": pa.array(np.ones(num, np.int16)),
            "created_at": own["created_at"] if num else pa.array([], pa.timestamp("us", tz="UTC")),
        }
        return pa.table(columns).cast(ERROR_SCHEMA)


def delete_obsolete(layout: RunLayout, live: set[str]) -> None:
    """Wave files outside the current chain, and per-row indexes of the pre-wave dedup."""
    for obj in layout.storage.list(DEDUP_PREFIX):
        obsolete_wave = obj.key.startswith(WAVES_PREFIX) and obj.key not in live
        legacy_index = obj.key.startswith(f"{DEDUP_PREFIX}index-")
        if obsolete_wave or legacy_index:
            layout.storage.delete(obj.key)

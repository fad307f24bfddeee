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
  (exact: permuted sorted tables, ``pipeline/near_dup.py``, no cap, no missed pair); a byte copy
  counts with the pHash of the first row of its sha256 (``pipeline/dedup_sweep.py``), should the
  copies' own pHashes differ;
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
all, not per wave. :meth:`WaveDedup.decide` (the streaming path) decides a wave of B rows through
indexes kept as runs of the logarithmic method (``pipeline/dedup_index.py``): O(B log^2 N) plus the
near-duplicate candidates it verifies, N being the rows decided so far, so a streamed run costs
about what the one-shot sweep costs, not O(K N log N) over K waves. Memory: about 100 bytes per row
of compact columns (sha256 as 32 bytes, pHash, pixels, bytes, positions); item ids and references
are read per wave, and held only for the dropped rows and their representatives when the drop
table is written.
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

from ps3_engine.pipeline.dedup_store import (
    ALGORITHM,
    HASH_COLUMNS,
    READ_THREADS,
    ROOT,
    WAVES_PREFIX,
    Compact,
    DropRows,
    Wave,
    chain_fingerprint,
    delete_obsolete,
    group_waves,
    persisted_chain,
    read_compact,
    read_links,
    read_names,
    read_shard,
    read_wave_file,
    wave_table,
    write_links,
    write_parquet,
    write_wave,
)
from ps3_engine.pipeline.dedup_sweep import DedupState, digest_groups, shard_order_key, solve_waves, wave_key
from ps3_engine.pipeline.layout import RunLayout

logger = logging.getLogger(__name__)

__all__ = [
    "HASH_COLUMNS",
    "WAVES_PREFIX",
    "DedupOutcome",
    "WaveDedup",
    "find_duplicates",
    "run_dedup",
    "solve",
    "wave_key",
]


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
    # The reused waves' state was rebuilt from their persisted links (no pair search over them).
    resumed: bool = False


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


def _fingerprint(shards: dict[str, str], max_distance: int, wave_shards: int) -> str:
    payload = {"algorithm": ALGORITHM, "max_distance": max_distance, "wave_shards": wave_shards, "shards": shards}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def dedup_fingerprint(layout: RunLayout, max_distance: int, wave_shards: int = 64) -> str:
    shards = {s: m.output_checksum for s, m in sorted(layout.manifests("crawl").items())}
    return _fingerprint(shards, max_distance, wave_shards)


# -- the stage-by-stage path ------------------------------------------------------------------------


def _committed(layout: RunLayout) -> tuple[dict[str, str], dict[str, int]]:
    """Output checksum and rows of every committed crawl shard."""
    manifests = sorted(layout.manifests("crawl").items())
    return {s: m.output_checksum for s, m in manifests}, {s: m.output_rows for s, m in manifests}


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
    shards, shard_rows = _committed(layout)
    fingerprint = _fingerprint(shards, max_distance, wave_shards)
    previous = storage.read_json(layout.DEDUP_MANIFEST_KEY) if storage.exists(layout.DEDUP_MANIFEST_KEY) else None
    if previous and previous.get("fingerprint") == fingerprint and storage.exists(layout.DEDUP_KEY):
        counts = (previous["kept"], previous["dropped_exact"], previous["dropped_near"])
        return DedupOutcome(fingerprint, *counts, recomputed=False, waves_reused=previous.get("waves", 0))
    waves = _ordered_waves(layout, shards, max_distance, wave_shards)
    compact, persisted, counts, rows_read = read_compact(layout, waves, shard_rows)
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
    resumed = False
    if computed:
        state = _resume(layout, waves, compact, persisted, max_distance)
        resumed = state is not None
        if state is None:
            state = _search_all(compact, counts, persisted, max_distance)
        representative, group, links = state.representative, state.group, state.links()
        del state
    else:
        representative, group, links = persisted, digest_groups(compact.sha_words)[0], None
    outcome = _write_waves_and_drops(layout, waves, compact, representative, group, max_distance, wave_shards)
    outcome = DedupOutcome(
        fingerprint,
        *outcome,
        recomputed=bool(computed),
        rows_read=rows_read,
        incremental=bool(computed) and len(computed) < len(waves),
        waves_computed=len(computed),
        waves_reused=len(waves) - len(computed),
        resumed=resumed,
    )
    if links is not None:
        write_links(layout, *links, waves)
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
    delete_obsolete(layout, {w.file_key for w in waves})
    logger.info(
        "dedup: %d kept, %d exact and %d near duplicates dropped (%d waves computed, %d reused%s, %d rows read)",
        outcome.kept,
        outcome.dropped_exact,
        outcome.dropped_near,
        outcome.waves_computed,
        outcome.waves_reused,
        " from their links" if resumed else "",
        outcome.rows_read,
    )
    return outcome


def _search_all(compact: Compact, counts: list[int], persisted: np.ndarray, max_distance: int) -> DedupState:
    """Decide every wave by one pair search over all rows (``counts``: rows per wave, in order)."""
    wave_of_row = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    state = DedupState.from_waves(
        compact.sha_words, compact.phash, compact.pixels, compact.num_bytes, wave_of_row, max_distance
    )
    reused = persisted >= 0
    # Internal invariant: the persisted decisions are a function of what their chain fingerprints cover.
    assert np.array_equal(state.representative[reused], persisted[reused]), "persisted dedup waves disagree"
    return state


def _from_links(
    layout: RunLayout, prefix: list[Wave], compact: Compact, persisted: np.ndarray, max_distance: int
) -> DedupState | None:
    """The state after the decided waves ``prefix`` (first in the order), from their persisted links.

    None when the links file's chain does not start with ``prefix`` or does not fit the decisions
    (the caller then searches the pairs again).
    """
    persisted_links = read_links(layout, prefix)
    if persisted_links is None:
        return None
    rows = prefix[-1].first_row + prefix[-1].num_rows
    head = _slice(compact, 0, rows)
    try:
        return DedupState.from_decided(
            head.sha_words,
            head.phash,
            head.pixels,
            head.num_bytes,
            persisted[:rows],
            *persisted_links,
            len(prefix),
            max_distance,
        )
    except ValueError as exc:
        logger.warning("dedup: %s; searching the pairs again", exc)
        return None


def _resume(
    layout: RunLayout, waves: list[Wave], compact: Compact, persisted: np.ndarray, max_distance: int
) -> DedupState | None:
    """The state after the reused waves, rebuilt from their persisted links, with the other waves added.

    Only when the reused waves come first in the order (new shards; a changed shard in a later wave)
    and the links file's chain starts with them; else None (the caller recomputes every wave).
    """
    num_reused = next((i for i, w in enumerate(waves) if not w.reused), len(waves))
    if num_reused == 0 or any(w.reused for w in waves[num_reused:]):
        return None
    state = _from_links(layout, waves[:num_reused], compact, persisted, max_distance)
    if state is None:
        return None
    for wave in waves[num_reused:]:
        part = _slice(compact, wave.first_row, wave.first_row + wave.num_rows)
        state.add_wave(part.sha_words, part.phash, part.pixels, part.num_bytes)
    return state


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
    drops = DropRows(dropped, representative)
    for wave in waves:
        if wave.reused:
            table = read_wave_file(layout, wave, ["shard_id", "item_id", "source_ref"])
        else:
            lo, hi = wave.first_row, wave.first_row + wave.num_rows
            names = read_names(layout, wave)
            table = wave_table(wave, names, _slice(compact, lo, hi), representative, group, compact.phash)
            write_wave(layout, wave, table, max_distance, wave_shards)
        drops.take(table, wave.first_row, wave.meta["created_at"])
    kept_of_dropped = representative[dropped]
    exact = group[dropped] == group[kept_of_dropped]
    distance = np.bitwise_count(compact.phash[dropped] ^ compact.phash[kept_of_dropped])
    write_parquet(layout, layout.DEDUP_KEY, drops.table(exact, distance))
    num_exact = int(np.count_nonzero(exact))
    return representative.size - dropped.size, num_exact, dropped.size - num_exact


# -- the streaming path ----------------------------------------------------------------------------


class WaveDedup:
    """In-memory state of decided waves for one run; persists each decided wave.

    The streaming run calls :meth:`decide` once per wave, in key order, as each wave's crawl shards
    commit; :func:`run_dedup` later finds every wave persisted and only writes the drop table. The
    state holds about 100 bytes per decided row of columns, plus about 50 bytes per distinct pHash
    of indexes; a wave costs about its own size (see :class:`~ps3_engine.pipeline.dedup_sweep.DedupState`).
    """

    def __init__(self, layout: RunLayout, max_distance: int, wave_shards: int) -> None:
        self.layout = layout
        self.max_distance = max_distance
        self.wave_shards = wave_shards
        self._state: DedupState | None = None
        self._waves: dict[tuple[str, int], Wave] = {}
        self._decided: list[Wave] = []  # in decided order (the chain)
        self._links_stale = False
        self._last: Wave | None = None
        self._undecided: set[tuple[str, int]] = set()

    def _load(self) -> DedupState:
        """Read the persisted waves whose chain matches the committed shards and rebuild their state."""
        shards, _ = _committed(self.layout)
        current = group_waves(shards, self.wave_shards)
        chain = persisted_chain(self.layout, current, self.max_distance, self.wave_shards)
        compact, persisted, counts, _ = read_compact(self.layout, chain, {})
        state = _from_links(self.layout, chain, compact, persisted, self.max_distance) if chain else None
        # Links rebuilt from the file are current; a state found by a pair search has links to write.
        self._links_stale = state is None
        if state is None:
            state = _search_all(compact, counts, persisted, self.max_distance)
        live = {w.file_key for w in chain}
        if any(obj.key not in live for obj in self.layout.storage.list(WAVES_PREFIX)):
            # Waves off the chain are stale; kept, one could rejoin the chain ahead of the waves this
            # gate decides (its shards committed again) and overturn their decisions.
            self._forget_drop_table()
            delete_obsolete(self.layout, live)
        self._waves = {w.key: w for w in chain}
        self._decided = list(chain)
        self._last = chain[-1] if chain else None
        self._undecided = set(current) - set(self._waves)
        how = "searched again" if self._links_stale else "rebuilt from their links"
        logger.info("dedup: %d persisted waves (%d rows) reused, %s", len(chain), state.num_rows, how)
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
            table = read_wave_file(self.layout, wave, ["shard_id", "item_id", "position", "representative"])
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
            tables = list(pool.map(lambda s: read_shard(self.layout, s, HASH_COLUMNS), shards))
        compact = Compact.concat([Compact.of(t) for t in tables])
        wave.num_rows = compact.phash.size
        self._state.add_wave(compact.sha_words, compact.phash, compact.pixels, compact.num_bytes)
        state = self._state
        table = wave_table(wave, tables, compact, state.representative, state.group, state.phash)
        self._forget_drop_table()
        write_wave(self.layout, wave, table, self.max_distance, self.wave_shards)
        self._waves[key], self._last = wave, wave
        self._decided.append(wave)
        self._links_stale = True
        self._undecided.discard(key)
        return self._drops_by_shard(table, shard_ids)

    def persist_links(self) -> None:
        """Write the links of every decided wave, once no more waves are coming (the run's crawl is done).

        A later :func:`run_dedup` increment then rebuilds these waves from them instead of searching
        their pairs again. Writes nothing when this gate decided nothing and found the links current.
        """
        if self._state is None or not self._decided or not self._links_stale:
            return
        write_links(self.layout, *self._state.links(), self._decided)
        self._links_stale = False

    def _forget_drop_table(self) -> None:
        """Delete run_dedup's manifest before the wave files change: it vouches for a drop table of the
        waves as they were, and a run_dedup over the same shards would otherwise return that table."""
        self.layout.storage.delete(self.layout.DEDUP_MANIFEST_KEY)

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

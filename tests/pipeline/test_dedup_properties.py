"""Adversarial properties of the wave dedup: every path (one-shot sweep, streaming, rebuilt from links)
gives the brute-force wave-rule decisions on small, hostile data (dense buckets, ties, byte copies
with other pHashes, colliding sha256 first words, empty and one-row waves), and run_dedup increments
and restarted streaming gates over shards that commit, change, vanish and come back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.dedup import WaveDedup, run_dedup, wave_key
from ps3_engine.pipeline.dedup_index import NearIndex
from ps3_engine.pipeline.dedup_store import LINKS_KEY, group_waves, persisted_chain, read_wave_file
from ps3_engine.pipeline.dedup_sweep import DedupState
from ps3_engine.pipeline.layout import RunLayout
from tests.pipeline.test_dedup_waves import brute_force_waves, commit_crawl_shard

DISTANCES = [0, 1, 3, 4, 7, 8]


def _hash_strategy() -> st.SearchStrategy[int]:
    """Hashes that crowd few substring buckets: low popcount, all-zero high bits, or one base with a
    few bits flipped in one region, besides uniform ones."""
    base = 0x0123_4567_89AB_CDEF
    return st.one_of(
        st.integers(0, 2**64 - 1),
        st.lists(st.integers(0, 63), max_size=3).map(lambda bits: sum(1 << b for b in set(bits))),
        st.integers(0, 2**12 - 1),
        st.lists(st.integers(0, 63), max_size=9).map(lambda bits: base ^ sum(1 << b for b in set(bits))),
        st.lists(st.integers(40, 52), max_size=6).map(lambda bits: base ^ sum(1 << b for b in set(bits))),
    )


@st.composite
def wave_data(draw, max_rows: int = 40) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Rows in canonical order with their wave ordinals (waves may be empty), and sha256 words whose
    first word collides between distinct digests."""
    num_waves = draw(st.integers(1, 8))
    num = draw(st.integers(0, max_rows))
    hashes = draw(st.lists(_hash_strategy(), min_size=1, max_size=12))
    phash = np.array([hashes[draw(st.integers(0, len(hashes) - 1))] for _ in range(num)], np.uint64)
    digest = np.array(draw(st.lists(st.integers(0, 2 * max(num, 1)), min_size=num, max_size=num)), np.int64)
    wave = np.sort(np.array(draw(st.lists(st.integers(0, num_waves - 1), min_size=num, max_size=num)), np.int64))
    pixels = np.array(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=num, max_size=num)), np.int64)
    num_bytes = np.array(draw(st.lists(st.sampled_from([10, 11]), min_size=num, max_size=num)), np.int64)
    if draw(st.booleans()):
        # Byte copies look like copies: the first occurrence's pHash, size and bytes.
        _, first, inverse = np.unique(digest, return_index=True, return_inverse=True)
        phash, pixels, num_bytes = (c[first[inverse]] for c in (phash, pixels, num_bytes))
    words = np.zeros((num, 4), np.uint64)
    words[:, 0] = digest % 3  # distinct digests share first words
    words[:, 1] = digest
    rows = {"phash": phash, "pixels": pixels, "num_bytes": num_bytes, "digest": digest, "wave": wave}
    return rows, num_waves, words


def reference(rows: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The wave rule by brute force, with a byte copy's pHash taken from the first row of its digest."""
    _, first, inverse = np.unique(rows["digest"], return_index=True, return_inverse=True)
    if not rows["digest"].size:
        return np.empty(0, np.int64)
    return brute_force_waves({**rows, "phash": rows["phash"][first[inverse]]}, k)


def columns(rows: dict[str, np.ndarray], words: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    return words[mask], rows["phash"][mask], rows["pixels"][mask], rows["num_bytes"][mask]


def streamed(state: DedupState, rows, words, waves: range) -> DedupState:
    for k in waves:
        state.add_wave(*columns(rows, words, rows["wave"] == k))
    return state


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(wave_data(), st.sampled_from(DISTANCES), st.data())
def test_every_path_gives_the_brute_force_wave_decisions(data, k, draw):
    rows, num_waves, words = data
    expected = reference(rows, k)
    everything = np.ones(rows["wave"].size, bool)

    if rows["wave"].size:
        once = DedupState.from_waves(*columns(rows, words, everything), rows["wave"], k)
        assert np.array_equal(once.representative, expected)

    one_by_one = streamed(DedupState(k), rows, words, range(num_waves))
    assert np.array_equal(one_by_one.representative, expected)

    split = draw.draw(st.integers(0, num_waves))
    head = rows["wave"] < split
    if head.any():
        swept = DedupState.from_waves(*columns(rows, words, head), rows["wave"][head], k)
        resumed = streamed(swept, rows, words, range(split, num_waves))
        # from_waves counts waves up to its last row; streaming on continues from there.
        assert np.array_equal(resumed.representative, expected)

    # Rebuilt from the decisions and links of a prefix (from the sweep and from the streamed state).
    for source in (one_by_one, once if rows["wave"].size else one_by_one):
        links, link_wave = source.links()
        inside = link_wave < split
        rebuilt = DedupState.from_decided(
            *columns(rows, words, head), expected[head], links[inside], link_wave[inside], split, k
        )
        rebuilt = streamed(rebuilt, rows, words, range(split, num_waves))
        assert np.array_equal(rebuilt.representative, expected)
        # And again from the rebuilt state's own links at another prefix.
        again_split = draw.draw(st.integers(0, num_waves))
        again_head = rows["wave"] < again_split
        links, link_wave = rebuilt.links()
        inside = link_wave < again_split
        again = DedupState.from_decided(
            *columns(rows, words, again_head),
            expected[again_head],
            links[inside],
            link_wave[inside],
            again_split,
            k,
        )
        again = streamed(again, rows, words, range(again_split, num_waves))
        assert np.array_equal(again.representative, expected)


@SETTINGS
@given(
    st.lists(st.lists(_hash_strategy(), max_size=30), min_size=1, max_size=12),
    st.sampled_from([*DISTANCES, 2, 5, 6, 10]),
)
def test_near_index_is_exact_on_crowded_buckets(batches, k):
    index, held = NearIndex(k), np.empty(0, np.uint64)
    for batch in batches:
        queries = np.unique(np.array(batch, np.uint64))
        queries = queries[~np.isin(queries, held)]
        q, ids = index.query(queries)
        got = set(zip(q.tolist(), ids.tolist(), strict=True))
        qi, hi = np.nonzero(np.bitwise_count(queries[:, None] ^ held[None, :]) <= k)
        assert got == set(zip(qi.tolist(), hi.tolist(), strict=True))
        index.add(queries, np.arange(held.size, held.size + queries.size))
        held = np.concatenate([held, queries])


# -- increments through a run layout ----------------------------------------------------------------

WAVE_SHARDS = 2
MAIN, NEW = "b0000000", "a0000000"  # the source added later sorts first


def hostile_shard(rng: np.random.Generator, pool: np.ndarray, consistent: bool) -> dict[str, np.ndarray]:
    """0-8 rows from a crowded pHash pool over few digests (hex digests: every first word is 0)."""
    num = int(rng.choice([0, 1, 1, 2, 3, 5, 8]))
    digest = rng.integers(0, 30, num).astype(np.int64)
    rows = {
        "phash": pool[rng.integers(0, pool.size, num)],
        "pixels": rng.choice([1, 2, 3], num).astype(np.int64),
        "num_bytes": rng.choice([10, 11], num).astype(np.int64),
        "digest": digest,
    }
    if consistent:  # a digest has one pHash, size and byte count, as real byte copies do
        rows.update(phash=pool[(digest * 7919) % pool.size], pixels=digest % 3 + 1, num_bytes=10 + digest % 2)
    return rows


class Increments:
    """A run whose crawl shards commit, change and disappear between dedups (run_dedup or a streaming
    gate, fresh or kept): the persisted chain follows the wave-order rule and every persisted decision
    and the drop table equal the brute-force wave rule over the rows in their decided order."""

    def __init__(self, seed: int, root: str) -> None:
        self.rng = rng = np.random.default_rng(seed)
        self.k = int(rng.choice(DISTANCES))
        base = int(rng.integers(0, 2**63))
        flips = [rng.choice(64, rng.integers(0, self.k + 3), replace=False) for _ in range(10)]
        pool = [base ^ sum(1 << int(b) for b in bits) for bits in flips] + [0, 1, 3 << 60, 7 << 20]
        self.pool = np.array(pool + rng.integers(0, 2**12, 3).tolist(), np.uint64)
        self.consistent = bool(rng.random() < 0.6)
        ids = [f"{MAIN}-{i:05d}" for i in range(rng.integers(2, 9))] + [
            f"{NEW}-{i:05d}" for i in range(rng.integers(1, 4))
        ]
        self.shards = {s: hostile_shard(rng, self.pool, self.consistent) for s in ids}
        self.layout = RunLayout(Storage(root))
        self.committed: dict[str, dict] = {}
        self.order: list[tuple] = []  # expected decided order: (wave key, its shards and checksums)
        self.gate: WaveDedup | None = None

    def commit(self, shard_id: str, rows: dict[str, np.ndarray]) -> None:
        commit_crawl_shard(self.layout, shard_id, rows)
        self.committed[shard_id] = rows

    def current(self) -> dict:
        checksums = {s: self.layout.read_manifest("crawl", s).output_checksum for s in self.committed}
        return group_waves(checksums, WAVE_SHARDS)

    def unchanged_prefix(self, current: dict) -> list[tuple]:
        prefix = []
        for key, shards in self.order:
            if current.get(key) != shards:
                break
            prefix.append((key, shards))
        return prefix

    def run(self) -> None:
        current = self.current()
        self.order = self.unchanged_prefix(current)
        done = {key for key, _ in self.order}
        self.order += [(key, current[key]) for key in sorted(current) if key not in done]
        run_dedup(self.layout, self.k, WAVE_SHARDS)
        item_ids, expected = self.check()
        assert self.layout.dropped_item_ids() == {
            item_ids[i] for i in np.flatnonzero(expected != np.arange(expected.size))
        }

    def stream(self, fresh: bool) -> None:
        """Decide every complete undecided wave in key order (the gate waits at an incomplete one)."""
        if fresh or self.gate is None:
            self.gate = WaveDedup(self.layout, self.k, WAVE_SHARDS)
        current = self.current()
        self.order = self.unchanged_prefix(current)
        done = {key for key, _ in self.order}
        for key in sorted(set(current) - done):
            if set(current[key]) != {s for s in self.shards if wave_key(s, WAVE_SHARDS) == key}:
                break
            self.gate.decide(sorted(current[key]))
            self.order.append((key, current[key]))
        self.check()

    def check(self) -> tuple[list[str], np.ndarray]:
        chain = persisted_chain(self.layout, self.current(), self.k, WAVE_SHARDS)
        assert [(w.key, w.shards) for w in chain] == self.order
        parts, got, item_ids = [], [], []
        for ordinal, wave in enumerate(chain):
            for shard_id in wave.shards:  # canonical order
                rows = self.committed[shard_id]
                parts.append({**rows, "wave": np.full(rows["phash"].size, ordinal, np.int64)})
                item_ids += [f"item-{shard_id}-{i}" for i in range(rows["phash"].size)]
            got.append(read_wave_file(self.layout, wave, ["representative"])["representative"].to_numpy())
        names = ("phash", "pixels", "num_bytes", "digest", "wave")
        empty = {n: np.empty(0, np.uint64 if n == "phash" else np.int64) for n in names}
        rows = {n: np.concatenate([empty[n], *(p[n] for p in parts)]) for n in names}
        expected = reference(rows, self.k)
        assert np.array_equal(np.concatenate([np.empty(0, np.int64), *got]), expected)
        return item_ids, expected

    def play(self, num_steps: int) -> None:
        rng, main = self.rng, sorted(s for s in self.shards if s.startswith(MAIN))
        for _ in range(num_steps):
            action = rng.choice(["more", "more", "run", "run", "stream", "keep", "change", "new", "links", "delete"])
            pending = [s for s in main if s not in self.committed and s in self.shards]
            if action == "more":
                for shard_id in pending[: rng.integers(1, 4)]:
                    self.commit(shard_id, self.shards[shard_id])
            elif action == "new":
                for shard_id in (s for s in self.shards if s.startswith(NEW)):
                    self.commit(shard_id, self.shards[shard_id])
            elif action in ("change", "delete") and self.committed:
                shard_id = sorted(self.committed)[rng.integers(0, len(self.committed))]
                if action == "change":
                    self.shards[shard_id] = hostile_shard(rng, self.pool, self.consistent)
                    self.commit(shard_id, self.shards[shard_id])
                else:
                    self.layout.storage.delete(self.layout.manifest_key("crawl", shard_id))
                    del self.committed[shard_id], self.shards[shard_id]
                self.gate = None  # a gate refuses a wave decided with other shards
            elif action == "links" and self.layout.storage.exists(LINKS_KEY):
                data = self.layout.storage.read_bytes(LINKS_KEY)
                self.layout.storage.write_bytes_atomic(LINKS_KEY, data[: len(data) // 2])
            elif action == "run":
                self.run()
            elif action in ("stream", "keep"):
                self.stream(fresh=action == "stream")
        for shard_id in main:
            if shard_id in self.shards and shard_id not in self.committed:
                self.commit(shard_id, self.shards[shard_id])
        self.run()


@pytest.mark.parametrize("seed", range(24))
def test_increments_streams_changes_and_damaged_links_keep_the_wave_rule(tmp_path, seed):
    Increments(seed, str(tmp_path / "run")).play(num_steps=8)


def test_a_streamed_decision_stays_final_when_an_earlier_decided_shard_comes_back(tmp_path):
    """run_dedup decided a0 then b0 (a0's prefix sorts first); a0's shard went away and a new gate
    decided b0 alone (its image kept and streamed on); a0 then commits again with the same output.
    b0's decision is final: a0 now comes after it and its larger near copy is the one dropped. Before
    the fix run_dedup returned its earlier drop table (its manifest named the same shards), and the
    stale a0 wave file would have rejoined the chain ahead of b0."""
    layout = RunLayout(Storage(str(tmp_path / "run")))
    one = {"num_bytes": np.array([10]), "digest": np.array([1])}
    early = {**one, "phash": np.array([0xF0F0], np.uint64), "pixels": np.array([50])}
    later = {**one, "phash": np.array([0xF0F1], np.uint64), "pixels": np.array([10]), "digest": np.array([2])}
    commit_crawl_shard(layout, f"{NEW}-00000", early)
    commit_crawl_shard(layout, f"{MAIN}-00000", later)
    run_dedup(layout, 4, WAVE_SHARDS)
    assert layout.dropped_item_ids() == {f"item-{MAIN}-00000-0"}
    layout.storage.delete(layout.manifest_key("crawl", f"{NEW}-00000"))
    assert WaveDedup(layout, 4, WAVE_SHARDS).decide([f"{MAIN}-00000"]) == {f"{MAIN}-00000": ()}
    commit_crawl_shard(layout, f"{NEW}-00000", early)
    run_dedup(layout, 4, WAVE_SHARDS)
    assert layout.dropped_item_ids() == {f"item-{NEW}-00000-0"}

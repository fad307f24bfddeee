"""Indexes of the streamed dedup: exact near search in runs, exact key lookup, and the streamed state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps3_engine.pipeline.dedup_index import Buffer, NearIndex, SortedRuns, substrings
from ps3_engine.pipeline.dedup_sweep import DedupState
from tests.pipeline.test_dedup_waves import K, brute_force_waves, flip_bits, solve_rows, wave_rows


@given(st.integers(0, 8), st.data())
def test_substrings_cover_64_bits_and_satisfy_the_pigeonhole(k, data):
    num = data.draw(st.integers(1, k + 1))
    layout = substrings(num, k)
    assert sum(width for _, width, _ in layout) == 64
    assert [shift for shift, _, _ in layout] == np.cumsum([0] + [w for _, w, _ in layout[:-1]]).tolist()
    # Any pair within k bits is within the radius on some substring: sum(radius + 1) = k + 1.
    assert sum(radius + 1 for _, _, radius in layout) == k + 1
    assert all(radius >= 0 for _, _, radius in layout)


def test_substrings_refuse_a_count_that_leaves_a_substring_without_radius():
    with pytest.raises(ValueError, match=r"need 1\.\.5"):
        substrings(6, 4)


def brute_pairs(queries: np.ndarray, values: np.ndarray, ids: np.ndarray, k: int) -> set[tuple[int, int]]:
    q, v = np.nonzero(np.bitwise_count(queries[:, None] ^ values[None, :]) <= k)
    return set(zip(q.tolist(), ids[v].tolist(), strict=True))


@pytest.mark.parametrize("k", [0, 2, 4, 6])
def test_near_index_finds_exactly_the_pairs_brute_force_finds_over_many_runs(k):
    """Batches of uniform hashes, near variants of earlier ones (0..k+2 bits) and a dense cluster
    (hashes differing in 10 low bits only, so one bucket holds hundreds): every query's pairs equal
    the brute-force ones, while runs are merged along the way."""
    rng = np.random.default_rng(k)
    index, held, held_ids = NearIndex(k), np.empty(0, np.uint64), np.empty(0, np.int64)
    dense_base = np.uint64(0xABCD_EF01_2345_0000)
    runs_seen = set()
    for batch in range(24):
        parts = [rng.integers(0, 2**64, 300, dtype=np.uint64)]
        if held.size:
            parts.append(flip_bits(rng, held[rng.integers(0, held.size, 200)], 0, k + 2))
        parts.append(dense_base | rng.integers(0, 1024, 60).astype(np.uint64))
        queries = np.unique(np.concatenate(parts))
        queries = queries[~np.isin(queries, held)]
        q, i = index.query(queries)
        assert set(zip(q.tolist(), i.tolist(), strict=True)) == brute_pairs(queries, held, held_ids, k), batch
        ids = 1000 * batch + np.arange(queries.size)
        index.add(queries, ids)
        held, held_ids = np.concatenate([held, queries]), np.concatenate([held_ids, ids])
        runs_seen.add(index.num_runs)
    assert len(index) == held.size
    # The logarithmic method: several runs at times, few at any time.
    assert max(runs_seen) >= 3 and max(runs_seen) <= 2 * np.log2(held.size)


def test_sorted_runs_find_every_key_added_in_batches_and_nothing_else():
    rng = np.random.default_rng(1)
    keys = rng.permutation(np.arange(1, 50_001, dtype=np.uint64) * np.uint64(7919))
    runs = SortedRuns()
    for part in np.array_split(keys, 41):
        runs.add(part, part.astype(np.int64) + 5)
    assert len(runs) == keys.size and runs.num_runs <= 2 * np.log2(41)
    probe = np.concatenate([keys[:1000], keys[-1000:], np.array([0, 3, 7918, 2**64 - 1], np.uint64)])
    expected = np.r_[keys[:1000].astype(np.int64) + 5, keys[-1000:].astype(np.int64) + 5, [-1, -1, -1, -1]]
    assert np.array_equal(runs.find(probe), expected)


def test_buffer_appends_keep_earlier_rows_and_views():
    buffer = Buffer.of(np.arange(3, dtype=np.int64))
    before = buffer.view
    for start in range(3, 100, 7):
        buffer.append(np.arange(start, start + 7))
    assert np.array_equal(buffer.view, np.arange(101))
    assert np.array_equal(before, [0, 1, 2])
    words = Buffer(np.uint64, width=4)
    words.append(np.ones((5, 4), np.uint64))
    assert words.view.shape == (5, 4)


# -- the streamed state --------------------------------------------------------------------------


def stream(rows: dict[str, np.ndarray], words: np.ndarray, num_waves: int, split: int = 0) -> np.ndarray:
    """Representatives from deciding waves ``< split`` at once (as a restarted gate does), then one by one."""
    head = rows["wave"] < split
    state = DedupState.from_waves(
        words[head], rows["phash"][head], rows["pixels"][head], rows["num_bytes"][head], rows["wave"][head], K
    )
    parts = [state.representative.copy()]
    for k in range(split, num_waves):
        m = rows["wave"] == k
        parts.append(state.add_wave(words[m], rows["phash"][m], rows["pixels"][m], rows["num_bytes"][m]))
    assert np.array_equal(np.concatenate(parts), state.representative)
    return state.representative


@pytest.mark.parametrize("split", [0, 7])
def test_streamed_waves_over_merged_runs_equal_the_sweep_and_brute_force(split):
    """20 waves: the indexes merge runs several times; a restart after 7 waves rebuilds them."""
    rows = wave_rows(8000, num_waves=20, seed=11)
    words = np.zeros((rows["digest"].size, 4), np.uint64)
    words[:, 0] = rows["digest"]
    got = stream(rows, words, 20, split)
    assert np.array_equal(got, solve_rows(rows, K))
    assert np.array_equal(got, brute_force_waves(rows, K))


def test_streamed_digests_are_exact_when_first_words_collide():
    """Distinct sha256 digests sharing their first 64 bits must not be taken for byte copies: rows
    with such digests and far-apart pHashes stay kept, while true copies across waves are dropped."""
    rng = np.random.default_rng(5)
    num = 400
    phash = rng.integers(0, 2**64, num, dtype=np.uint64)
    words = rng.integers(0, 2**63, (num, 4), dtype=np.uint64)
    words[100:200, 0] = words[0:100, 0]  # wave 1 collides with wave 0 on the first word only
    words[150:160, 0] = words[140, 0]  # and among themselves
    words[300:320] = words[10:30]  # true byte copies of wave 0, in wave 3
    phash[300:320] = phash[10:30]
    wave = np.repeat(np.arange(4), 100)
    pixels, num_bytes = np.full(num, 10_000, np.int64), np.full(num, 1000, np.int64)
    state = DedupState.from_waves(words[:100], phash[:100], pixels[:100], num_bytes[:100], wave[:100], K)
    for k in range(1, 4):
        m = wave == k
        state.add_wave(words[m], phash[m], pixels[m], num_bytes[m])
    representative = state.representative
    expected = np.arange(num)
    expected[300:320] = np.arange(10, 30)
    assert np.array_equal(representative, expected)
    group = state.group
    assert len(set(group[100:200].tolist()) | set(group[:100].tolist())) == 200
    assert np.array_equal(group[300:320], group[10:30])


@pytest.mark.parametrize("split", [1, 5, 9])
def test_state_rebuilt_from_decisions_and_links_decides_later_waves_like_the_sweep(split):
    """from_decided (decisions and links of the first waves, no pair search) then add_wave for the
    rest gives the decisions of one sweep over all waves: bridged clusters, chains, later larger
    copies and byte copies across the split included."""
    rows = wave_rows(6000, num_waves=12, seed=4)
    words = np.zeros((rows["digest"].size, 4), np.uint64)
    words[:, 0] = rows["digest"]
    head = rows["wave"] < split
    decided = DedupState.from_waves(
        words[head], rows["phash"][head], rows["pixels"][head], rows["num_bytes"][head], rows["wave"][head], K
    )
    state = DedupState.from_decided(
        words[head],
        rows["phash"][head],
        rows["pixels"][head],
        rows["num_bytes"][head],
        decided.representative,
        *decided.links(),
        split,
        K,
    )
    for k in range(split, 12):
        m = rows["wave"] == k
        state.add_wave(words[m], rows["phash"][m], rows["pixels"][m], rows["num_bytes"][m])
    expected = solve_rows(rows, K)
    assert np.array_equal(state.representative, expected)
    # The links carried forward rebuild the whole run again, from any prefix.
    links, link_wave = state.links()
    again = DedupState.from_decided(
        words, rows["phash"], rows["pixels"], rows["num_bytes"], expected, links, link_wave, 12, K
    )
    assert np.array_equal(again.representative, expected)


def test_from_decided_refuses_links_that_do_not_fit_the_decisions():
    rows = wave_rows(2000, num_waves=3, seed=8)
    words = np.zeros((rows["digest"].size, 4), np.uint64)
    words[:, 0] = rows["digest"]
    columns = (words, rows["phash"], rows["pixels"], rows["num_bytes"])
    state = DedupState.from_waves(*columns, rows["wave"], K)
    links, link_wave = state.links()
    with pytest.raises(ValueError, match="disagree with the persisted decisions"):
        DedupState.from_decided(*columns, state.representative, links[:0], link_wave[:0], 3, K)
    with pytest.raises(ValueError, match="past the decided rows"):
        DedupState.from_decided(*columns, state.representative, links + 10**6, link_wave, 3, K)

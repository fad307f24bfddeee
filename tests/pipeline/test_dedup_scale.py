"""Dedup at scale: exact against brute force (one wave), dense hash groups, and edges that serve every wave prefix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ps3_engine.pipeline import near_dup
from ps3_engine.pipeline.dedup import solve
from ps3_engine.pipeline.near_dup import components, near_edges


def random_hashes(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 2**64, size, dtype=np.uint64)


def flip_random_bits(rng: np.random.Generator, values: np.ndarray, max_bits: int) -> np.ndarray:
    """Each value with 1..max_bits distinct random bits flipped."""
    out = values.copy()
    for i, count in enumerate(rng.integers(1, max_bits + 1, values.size)):
        for bit in rng.choice(64, count, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(bit)
    return out


def synthetic_rows(num_rows: int, seed: int) -> dict[str, np.ndarray]:
    """Rows in canonical order: unique images, planted near clusters (chains, some just beyond k=4),
    a dense near-blank group, a group sharing 48 bits, and byte copies. Sizes tie often on purpose."""
    rng = np.random.default_rng(seed)
    num_copies, num_dense = num_rows // 12, num_rows // 60
    num_base = (num_rows - num_copies - 2 * num_dense) * 3 // 4
    base = random_hashes(rng, num_base)
    first_variants = flip_random_bits(rng, base[rng.integers(0, num_base, num_base // 4)], 6)
    num_chained = num_rows - num_copies - 2 * num_dense - num_base - num_base // 4
    chained = flip_random_bits(rng, first_variants[:num_chained], 5)
    blank = np.zeros(num_dense, np.uint64)
    for _ in range(3):
        blank |= np.uint64(1) << rng.integers(0, 64, num_dense).astype(np.uint64)
    shared = np.uint64(0xDEAD_BEEF_CAFE_0000) | rng.integers(0, 2**16, num_dense, dtype=np.uint64)
    phash = np.concatenate([base, first_variants, chained, blank, shared])
    images = {
        "sha256": np.array([f"{i:064x}" for i in range(phash.size)]),
        "phash": phash,
        "width": rng.choice([100, 200, 300], phash.size).astype(np.int32),
        "height": rng.choice([100, 150], phash.size).astype(np.int32),
        "num_bytes": rng.integers(1000, 1010, phash.size),
    }
    picks = np.concatenate([np.arange(phash.size), rng.integers(0, phash.size, num_copies)])
    order = rng.permutation(picks)
    return {name: column[order] for name, column in images.items()}


def digest_ids_of(sha256: np.ndarray) -> np.ndarray:
    return pa.array(sha256).dictionary_encode().indices.to_numpy().astype(np.int64)


def brute_force_kept_rows(rows: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The decision by definition: every pair of distinct digests compared (popcount in chunks)."""
    digest_ids = digest_ids_of(rows["sha256"])
    _, first = np.unique(digest_ids, return_index=True)
    values = rows["phash"][first]
    pairs_a, pairs_b = [], []
    chunk, num = 512, values.size
    # Preallocated buffers (out=): numpy's temporaries would otherwise dominate this O(n^2) loop.
    xor, count, close = np.empty(chunk * num, np.uint64), np.empty(chunk * num, np.uint8), np.empty(chunk * num, bool)
    for start in range(0, num, chunk):
        block = values[start : start + chunk]
        shape = (block.size, num - start)
        size = shape[0] * shape[1]
        np.bitwise_xor(block[:, None], values[None, start:], out=xor[:size].reshape(shape))
        np.bitwise_count(xor[:size].reshape(shape), out=count[:size].reshape(shape))
        np.less_equal(count[:size].reshape(shape), k, out=close[:size].reshape(shape))
        i, j = np.nonzero(close[:size].reshape(shape))
        pairs_a.append(i + start)
        pairs_b.append(j + start)
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(values.size, values.size))
    label = connected_components(graph, directed=False)[1]
    pixels = rows["width"].astype(np.int64) * rows["height"]
    best: dict[int, int] = {}
    for digest, row in enumerate(first.tolist()):
        key = (pixels[row], rows["num_bytes"][row], -row)
        current = best.get(label[digest])
        if current is None or key > (pixels[current], rows["num_bytes"][current], -current):
            best[label[digest]] = row
    return np.array([best[label[d]] for d in digest_ids.tolist()])


def solve_rows(rows: dict[str, np.ndarray], k: int) -> np.ndarray:
    pixels = rows["width"].astype(np.int64) * rows["height"]
    return solve(digest_ids_of(rows["sha256"]), rows["phash"], pixels, rows["num_bytes"].astype(np.int64), k)


@pytest.mark.slow
def test_matches_brute_force_on_100k_hashes_with_planted_clusters():
    rows = synthetic_rows(100_000, seed=7)
    kept_row = solve_rows(rows, 4)
    expected = brute_force_kept_rows(rows, 4)
    assert np.array_equal(kept_row, expected)
    dropped = np.count_nonzero(kept_row != np.arange(kept_row.size))
    near = np.count_nonzero(digest_ids_of(rows["sha256"]) != digest_ids_of(rows["sha256"])[kept_row])
    # The data must exercise both kinds, not only trivial copies.
    assert dropped > 10_000 and near > 5_000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_small_dense_data(seed):
    rows = synthetic_rows(6_000, seed=seed)
    for k in (0, 3, 4, 6):
        assert np.array_equal(solve_rows(rows, k), brute_force_kept_rows(rows, k)), k


def brute_force_labels(values: np.ndarray, k: int) -> np.ndarray:
    close = np.bitwise_count(values[:, None] ^ values[None, :]) <= k
    return connected_components(coo_matrix(close), directed=False)[1]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("k", [1, 4, 6])
def test_large_groups_sharing_a_block_value_miss_no_pair(k):
    """Near-blank hashes and hashes sharing 60 bits put thousands of values into one group of every table."""
    rng = np.random.default_rng(k)
    blank = np.zeros(3000, np.uint64)
    for _ in range(4):
        blank |= np.uint64(1) << rng.integers(0, 64, blank.size).astype(np.uint64)
    shared = np.uint64(0xFFFF_FFFF_FFFF_F000) | rng.integers(0, 2**12, 3000, dtype=np.uint64)
    values = np.unique(np.concatenate([blank, shared, random_hashes(rng, 2000)]))
    assert same_partition(components(values.size, near_edges(values, k)), brute_force_labels(values, k))


def test_edges_of_a_new_batch_against_an_index_complete_the_old_components():
    rng = np.random.default_rng(3)
    values = np.unique(np.concatenate([(v := random_hashes(rng, 3000)), flip_random_bits(rng, v[:1500], 5)]))
    is_new = rng.random(values.size) < 0.2
    old = np.flatnonzero(~is_new)
    old_edges = near_edges(values[old], 4)
    seed = old[old_edges]
    new_edges = near_edges(values, 4, is_new)
    labels = components(values.size, np.concatenate([seed, new_edges], axis=1))
    assert same_partition(labels, brute_force_labels(values, 4))


@pytest.mark.parametrize(("k", "edge_buffer"), [(2, None), (4, None), (4, 500)])
def test_ranked_edges_keep_the_components_of_every_rank_prefix(k, edge_buffer, monkeypatch):
    """One search serves every wave: the edges of weight <= r span the components of the hashes of rank <= r."""
    if edge_buffer is not None:
        # Folds (minimum spanning forests) must keep the prefixes too.
        monkeypatch.setattr(near_dup, "EDGE_BUFFER", edge_buffer)
    rng = np.random.default_rng(k)
    blank = np.zeros(2000, np.uint64)
    for _ in range(4):
        blank |= np.uint64(1) << rng.integers(0, 64, blank.size).astype(np.uint64)
    base = random_hashes(rng, 2000)
    values = np.unique(np.concatenate([blank, base, flip_random_bits(rng, base, 5)]))
    rank = rng.integers(0, 6, values.size)
    edges = near_edges(values, k, rank=rank)
    weight = np.maximum(rank[edges[0]], rank[edges[1]])
    for r in range(6):
        inside = np.flatnonzero(rank <= r)
        labels = components(values.size, edges[:, weight <= r])[inside]
        assert same_partition(labels, brute_force_labels(values[inside], k)), r

"""Exact near-duplicate search over 64-bit hashes: permuted sorted tables (Manku, Jain, Das Sarma, WWW 2007).

The hash bits are split into ``m > k`` blocks. Two hashes within Hamming distance ``k`` differ in at most
``k`` blocks, so they agree exactly on the other ``m - k`` blocks (pigeonhole). Each of the ``C(m, k)``
"tables" groups the hashes by one choice of ``m - k`` key blocks (a sort of a packed key), and only hashes
in one group are compared (XOR + popcount). Every pair within ``k`` shares a group in at least one table,
so nothing is missed; with enough key bits the groups stay small and the work grows like ``n log n``.

A group that is still large (many distinct hashes agreeing on the key bits, e.g. near-blank images) is
searched again the same way over its remaining free bits, so its cost stays near-linear too; when no
split helps any more its pairs are checked exhaustively in chunks. Identical hashes are collapsed by the
caller first (they are trivially at distance 0).

Everything is vectorised numpy over the hash column; no Python object per hash.

With a ``rank`` per hash (the dedup wave it first appears in), the edges keep the components of every
prefix ``rank <= r``, not only of the whole graph, so one search serves a sweep over all waves: cliques
become stars centred on their lowest-rank member, and folds keep a minimum spanning forest under the
edge weight ``max(rank)`` (Kruskal adds edges in weight order, so the forest edges of weight <= r span
exactly the components of the subgraph of hashes of rank <= r).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import combinations
from math import comb

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

logger = logging.getLogger(__name__)

# Groups up to this size are compared pair by pair; larger ones are split again over their free bits.
GROUP_LIMIT = 1024
# Candidate pairs verified per numpy batch.
PAIR_BATCH = 2_000_000
# Relative cost of verifying one candidate pair vs sorting one element (measured on numpy 2.x, 2 cores).
PAIR_COST = 0.2
MAX_TABLES = 500
# Fixed cost of one table (numpy calls, Python), in sorted-element units: small groups go brute force.
TABLE_OVERHEAD = 20_000
# Edges buffered before they are folded into a spanning star per component (bounds memory).
EDGE_BUFFER = 4_000_000


@dataclass
class EdgeSink:
    """Collects verified edges between node ids; folds them into one star per component when large."""

    num_nodes: int
    # Optional ``int64[num_nodes]`` rank per node: edges then keep the components of every rank prefix.
    rank: np.ndarray | None = None
    _parts: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0
    _folded: int = 0
    _labels: np.ndarray | None = None
    # Id of the last large group searched exhaustively that holds each node (-1: none). A group that
    # falls wholly inside one such group again (dense hashes do, table after table) has no new pair.
    _searched: np.ndarray | None = None
    _num_searched: int = 0

    def already_searched(self, ids: np.ndarray) -> bool:
        if self._searched is None:
            return False
        marks = self._searched[ids]
        return bool(marks[0] >= 0 and np.all(marks == marks[0]))

    def mark_searched(self, ids: np.ndarray) -> None:
        if self._searched is None:
            self._searched = np.full(self.num_nodes, -1, np.int64)
        self._searched[ids] = self._num_searched
        self._num_searched += 1

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if self.rank is not None:
            self._add_ranked(a, b)
            return
        if self._labels is not None and a.size:
            # An edge inside a component known at the last fold adds nothing (dense clusters repeat them).
            crossing = self._labels[a] != self._labels[b]
            a, b = a[crossing], b[crossing]
        if a.size:
            self._parts.append(np.stack([a, b]).astype(np.int64, copy=False))
            self._buffered += a.size
            if self._buffered > max(EDGE_BUFFER, 2 * self._folded):
                self._labels = self.labels()
                self._parts = [_star_edges(self._labels)]
                self._buffered = self._folded = self._parts[0].shape[1]

    def _add_ranked(self, a: np.ndarray, b: np.ndarray) -> None:
        # No filter by the last fold's labels here: an edge inside a component of the whole graph may
        # still be the only link of an earlier prefix.
        if a.size:
            self._parts.append(np.stack([a, b]).astype(np.int64, copy=False))
            self._buffered += a.size
            if self._buffered > max(EDGE_BUFFER, 2 * self._folded):
                self._parts = [spanning_forest(self.edges(), self.rank)]
                self._buffered = self._folded = self._parts[0].shape[1]

    def star(self, ids: np.ndarray) -> None:
        """Link all of ``ids`` (members of a clique) by a star centred on the lowest-rank member."""
        centre = 0 if self.rank is None else int(np.argmin(self.rank[ids]))
        others = np.delete(ids, centre)
        self.add(np.full(others.size, ids[centre]), others)

    def add_linked(self, ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        """Add the edges ``ids[a] - ids[b]`` of one group as a star per local component (dense groups)."""
        if a.size and self.rank is not None:
            self.add(*spanning_forest(np.stack([ids[a], ids[b]]), self.rank))
        elif a.size:
            graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(ids.size, ids.size))
            star = _star_edges(connected_components(graph, directed=False)[1])
            self.add(ids[star[0]], ids[star[1]])

    def edges(self) -> np.ndarray:
        """All buffered edges as a ``(2, E)`` int64 array."""
        return np.concatenate(self._parts, axis=1) if self._parts else np.empty((2, 0), np.int64)

    def labels(self) -> np.ndarray:
        """Connected-component label per node (``num_nodes`` int32)."""
        a, b = self.edges()
        graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(self.num_nodes, self.num_nodes))
        return connected_components(graph, directed=False)[1]


def spanning_forest(edges: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """A minimum spanning forest of ``int64[2, E]`` edges under the weight ``max(rank[a], rank[b])``.

    Its edges of weight <= r span the components of the subgraph of nodes of rank <= r, for every r.
    """
    a, b = np.minimum(edges[0], edges[1]), np.maximum(edges[0], edges[1])
    nodes, local = np.unique(np.concatenate([a, b]), return_inverse=True)
    la, lb = local[: a.size], local[a.size :]
    # coo -> csr sums duplicate entries: keep one copy of each edge so that its weight stays its rank.
    _, first = np.unique(la * nodes.size + lb, return_index=True)
    la, lb = la[first], lb[first]
    # +1: scipy's csgraph treats a zero weight as no edge.
    weight = np.maximum(rank[nodes[la]], rank[nodes[lb]]).astype(np.float64) + 1.0
    graph = coo_matrix((weight, (la, lb)), shape=(nodes.size, nodes.size)).tocsr()
    tree = minimum_spanning_tree(graph).tocoo()
    return np.stack([nodes[tree.row], nodes[tree.col]]).astype(np.int64)


def _star_edges(labels: np.ndarray) -> np.ndarray:
    """Edges from every node to the first node of its component: same components, at most n - 1 edges."""
    _, first = np.unique(labels, return_index=True)
    roots = first[labels]
    nodes = np.flatnonzero(roots != np.arange(labels.size))
    return np.stack([nodes, roots[nodes]]).astype(np.int64)


def _bit_runs(mask: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of set bits of ``mask``, low to high."""
    runs, bit = [], 0
    while mask >> bit:
        if mask >> bit & 1:
            start = bit
            while mask >> bit & 1:
                bit += 1
            runs.append((start, bit - start))
        else:
            bit += 1
    return runs


def _packed_key(values: np.ndarray, mask: int) -> np.ndarray:
    """The bits of ``values`` selected by ``mask``, packed into the low ``popcount(mask)`` bits."""
    packed = np.zeros(values.size, np.uint64)
    offset = 0
    for start, length in _bit_runs(mask):
        packed |= ((values >> np.uint64(start)) & np.uint64((1 << length) - 1)) << np.uint64(offset)
        offset += length
    return packed


def _blocks(free_mask: int, num_blocks: int) -> list[int]:
    """Split the set bits of ``free_mask`` into ``num_blocks`` near-equal masks (consecutive positions)."""
    positions = [bit for bit in range(64) if free_mask >> bit & 1]
    return [sum(1 << int(bit) for bit in chunk) for chunk in np.array_split(positions, num_blocks)]


def _choose_blocks(n: int, num_free: int, k: int) -> int | None:
    """Block count with the least estimated work for ``n`` hashes, or None when brute force is cheaper."""
    best, best_cost = None, n * (n - 1) / 2 * PAIR_COST
    for m in range(k + 1, num_free + 1):
        tables = comb(m, k)
        if tables > MAX_TABLES:
            break
        sizes = sorted(len(c) for c in np.array_split(np.arange(num_free), m))
        key_bits = sum(sizes[: m - k])
        cost = tables * (TABLE_OVERHEAD + n + n * n / 2 / 2.0**key_bits * PAIR_COST)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def near_edges(
    values: np.ndarray, max_distance: int, is_new: np.ndarray | None = None, rank: np.ndarray | None = None
) -> np.ndarray:
    """Edges between distinct hashes within ``max_distance`` bits; exact (no pair is missed).

    Args:
        values: distinct 64-bit hashes, ``uint64[n]``.
        max_distance: the largest Hamming distance that links two hashes (k >= 0).
        is_new: optional ``bool[n]``; when given, edges between two non-new hashes may be left out
            (they are known from an earlier computation), which lets a small batch be compared
            against a large index without sorting the index into groups.
        rank: optional ``int64[n]`` (e.g. the wave a hash first appears in); when given, the edges keep
            the components of every subgraph ``rank <= r`` (see the module docstring). Not with ``is_new``.

    Returns:
        ``int64[2, E]`` node index pairs whose connected components equal those of the graph of all
        pairs within ``max_distance``. Not every such pair is listed: groups whose members all lie
        within k of each other contribute a star, and a large buffer is folded into one star per
        component (so an edge may join two nodes linked only through others). With ``rank``, every
        edge ``a - b`` joins nodes linked through nodes of rank <= ``max(rank[a], rank[b])``.
    """
    if rank is not None and is_new is not None:
        raise ValueError("near_edges takes rank or is_new, not both")
    values = np.ascontiguousarray(values, dtype=np.uint64)
    sink = EdgeSink(values.size, None if rank is None else np.asarray(rank, np.int64))
    _search(values, np.arange(values.size), (1 << 64) - 1, max_distance, is_new, sink)
    edges = sink.edges()
    if sink.rank is not None and edges.shape[1]:
        # Dense groups (near-blank images) leave many redundant pairs; the sweep needs a forest only.
        edges = spanning_forest(edges, sink.rank)
    return edges


def components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label per node for ``int64[2, E]`` edges."""
    sink = EdgeSink(num_nodes)
    sink.add(edges[0], edges[1])
    return sink.labels()


def _search(
    values: np.ndarray, ids: np.ndarray, free_mask: int, k: int, is_new: np.ndarray | None, sink: EdgeSink
) -> None:
    """Find the edges among ``values`` (which agree on every bit outside ``free_mask``)."""
    n = values.size
    if n < 2 or (is_new is not None and not is_new.any()):
        return
    if sink.already_searched(ids):
        return
    # Bits equal across the group carry no information: split only the ones that vary.
    free_mask &= int(np.bitwise_or.reduce(values ^ values[0]))
    num_free = free_mask.bit_count()
    if num_free <= k:
        # They differ only in <= k bits, so all are linked: a star is enough for the components.
        sink.star(ids)
        return
    num_blocks = _choose_blocks(n, num_free, k) if n > GROUP_LIMIT else None
    if num_blocks is None:
        _brute_force(values, ids, k, is_new, sink)
    else:
        blocks = _blocks(free_mask, num_blocks)
        for free_blocks in combinations(range(num_blocks), k):
            key_mask = sum(block for i, block in enumerate(blocks) if i not in free_blocks)
            _table(values, ids, key_mask, free_mask & ~key_mask, k, is_new, sink)
    if n > GROUP_LIMIT:
        sink.mark_searched(ids)


def _table(
    values: np.ndarray,
    ids: np.ndarray,
    key_mask: int,
    rest_mask: int,
    k: int,
    is_new: np.ndarray | None,
    sink: EdgeSink,
) -> None:
    """One sorted table: group by the key bits, compare inside small groups, recurse into large ones."""
    key = _packed_key(values, key_mask)
    members = np.arange(values.size)
    if is_new is not None:
        # Sort-based unique: numpy 2.4's hash-based np.unique (no return flags) is far slower on uint64.
        new_keys = np.sort(key[is_new])
        new_keys = new_keys[np.r_[True, new_keys[1:] != new_keys[:-1]]]
        at = np.minimum(np.searchsorted(new_keys, key), new_keys.size - 1)
        members = np.flatnonzero(new_keys[at] == key)
    local, sorted_key = sort_keys(key[members], key_mask.bit_count())
    order = members[local]
    del key
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    sizes = np.diff(np.r_[starts, sorted_key.size])
    large = sizes > GROUP_LIMIT
    for start, size in zip(starts[large], sizes[large], strict=True):
        group = order[start : start + size]
        group_new = None if is_new is None else is_new[group]
        _search(values[group], ids[group], rest_mask, k, group_new, sink)
    small = (sizes >= 2) & (sizes <= GROUP_LIMIT)
    _pairs_in_groups(values, ids, order, starts[small], sizes[small], k, is_new, sink)


def sort_keys(key: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order int64[n], key[order])``: a stable argsort of ``key_bits``-bit keys and the sorted keys.

    Sorts (key, position) packed in one uint64 when they fit: np.sort is much faster than argsort.
    """
    index_bits = max(int(key.size).bit_length(), 1)
    if key_bits + index_bits > 64:
        order = np.argsort(key, kind="stable")
        return order, key[order]
    packed = np.sort((key.astype(np.uint64) << np.uint64(index_bits)) | np.arange(key.size, dtype=np.uint64))
    return (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64), packed >> np.uint64(index_bits)


def _pairs_in_groups(
    values: np.ndarray,
    ids: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    k: int,
    is_new: np.ndarray | None,
    sink: EdgeSink,
) -> None:
    """Verify every pair inside the given groups of ``order`` (position p with each later one of its group)."""
    if not starts.size:
        return
    positions = np.repeat(starts, sizes) + (np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    later = np.repeat(starts + sizes, sizes) - positions - 1
    # Chunks of positions whose pairs fit in PAIR_BATCH, so memory stays bounded whatever the groups.
    bounds = np.searchsorted(np.cumsum(later), np.arange(PAIR_BATCH, int(later.sum()) + PAIR_BATCH, PAIR_BATCH))
    lo = 0
    for hi in np.unique(np.minimum(bounds + 1, later.size)):
        count = later[lo:hi]
        a = np.repeat(positions[lo:hi], count)
        b = a + 1 + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
        a, b = order[a], order[b]
        linked = np.bitwise_count(values[a] ^ values[b]) <= k
        if is_new is not None:
            linked &= is_new[a] | is_new[b]
        sink.add(ids[a[linked]], ids[b[linked]])
        lo = hi


def _brute_force(values: np.ndarray, ids: np.ndarray, k: int, is_new: np.ndarray | None, sink: EdgeSink) -> None:
    """All pairs, in row chunks of bounded memory (for groups no split makes cheaper)."""
    n = values.size
    chunk = max(1, (1 << 24) // n)
    found_a, found_b = [], []
    for start in range(0, n - 1, chunk):
        rows = np.arange(start, min(start + chunk, n - 1))
        close = np.bitwise_count(values[rows, None] ^ values[None, :]) <= k
        close &= np.arange(n)[None, :] > rows[:, None]
        if is_new is not None:
            close &= is_new[rows, None] | is_new[None, :]
        i, j = np.nonzero(close)
        found_a.append(rows[i])
        found_b.append(j)
    sink.add_linked(ids, np.concatenate(found_a), np.concatenate(found_b))

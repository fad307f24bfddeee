"""The dedup decision on arrays: waves of rows in canonical order, each decided against the earlier ones.

Pure numpy over compact columns (no strings): see :mod:`ps3_engine.pipeline.dedup` for the semantics
and the storage around them. Rows are given in canonical order (wave, then shard, then row); a row's
"node" is the pHash of the first row with its sha256 (byte copies share a node, so sha256 equality
links rows even if their pHashes were to differ), and rows are linked when their nodes are within
``max_distance`` bits.

:class:`WaveSweep` holds the state of the decided waves as a union-find over nodes: the parent of
each node, the size of each root's component and the best *kept* row of each root's component
(-1 while the component has no decided row). Deciding one wave costs O(rows of the wave + edges
of the wave) array work plus a constant number of numpy calls, so a sweep over K waves costs
O(N + E + K) after the edges, never O(N * K).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ps3_engine.pipeline.near_dup import near_edges


def wave_key(shard_id: str, wave_shards: int) -> tuple[str, int]:
    """``(source prefix, shard index // wave_shards)`` of a crawl shard id ``"<prefix>-<index>"``.

    Raises:
        ValueError: when ``shard_id`` does not end in ``-<decimal index>`` or ``wave_shards < 1``.
    """
    prefix, _, index = shard_id.rpartition("-")
    if not prefix or not index.isdecimal() or wave_shards < 1:
        raise ValueError(f"crawl shard id {shard_id!r} is not '<prefix>-<index>' (or wave size {wave_shards} < 1)")
    return prefix, int(index) // wave_shards


def shard_order_key(shard_id: str) -> tuple[str, int]:
    """Canonical order of crawl shards: by source prefix, then by numeric index (``-99999`` before ``-100000``)."""
    prefix, _, index = shard_id.rpartition("-")
    return prefix, int(index)


def digest_groups(sha_words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by sha256 given as ``uint64[n, 4]``: ``(group per row, first row of each group)``.

    Grouped by the first word, then checked on all four (a first-word collision of distinct digests
    falls back to a sort on all words), so the grouping is exact.
    """
    if sha_words.shape[0] == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, first, group = np.unique(sha_words[:, 0], return_index=True, return_inverse=True)
    group_first = first[group.reshape(-1)]
    # Word by word: a whole (n, 4) copy would add 32 bytes per row to the peak.
    if not all(np.array_equal(sha_words[group_first, word], sha_words[:, word]) for word in range(1, 4)):
        _, first, group = np.unique(sha_words, axis=0, return_index=True, return_inverse=True)
    return group.reshape(-1).astype(np.int64), first.astype(np.int64)


def row_nodes(sha_words: np.ndarray, phash: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(node values uint64[m] sorted, node per row int64[n], digest group per row int64[n])``."""
    group, first = digest_groups(sha_words)
    values, node_of_group = np.unique(phash[first], return_inverse=True)
    return values, node_of_group.reshape(-1)[group].astype(np.int64), group


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by a sort: numpy 2.4's hash-based ``np.unique`` (no return flags) is ~20x slower here."""
    ordered = np.sort(values.reshape(-1))
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if ordered.size else ordered


def _best_per_group(
    group: np.ndarray, rows: np.ndarray, pixels: np.ndarray, num_bytes: np.ndarray, num_groups: int
) -> np.ndarray:
    """Per group, the best of ``rows`` (most pixels, then most bytes, then earliest); -1 where none."""
    best = np.full(num_groups, -1, np.int64)
    if rows.size:
        order = np.lexsort((rows, -num_bytes[rows], -pixels[rows], group))
        head = np.r_[True, group[order][1:] != group[order][:-1]]
        best[group[order][head]] = rows[order][head]
    return best


class WaveSweep:
    """Union-find over nodes holding each component's best kept row; decides one wave at a time."""

    def __init__(self, num_nodes: int) -> None:
        self.parent = np.arange(num_nodes, dtype=np.int64)
        self.size = np.ones(num_nodes, np.int64)
        self.best = np.full(num_nodes, -1, np.int64)

    def grow(self, num_nodes: int) -> None:
        """Add singleton nodes up to ``num_nodes`` (new pHashes of a streamed wave)."""
        start = self.parent.size
        self.parent = np.concatenate([self.parent, np.arange(start, num_nodes, dtype=np.int64)])
        self.size = np.concatenate([self.size, np.ones(num_nodes - start, np.int64)])
        self.best = np.concatenate([self.best, np.full(num_nodes - start, -1, np.int64)])

    def find(self, nodes: np.ndarray) -> np.ndarray:
        """Root of each node, compressing the paths of the queried nodes (union by size keeps depth log n)."""
        root = self.parent[nodes]
        while True:
            up = self.parent[root]
            if np.array_equal(up, root):
                break
            root = up
        self.parent[nodes] = root
        return root

    def step(
        self,
        rows: np.ndarray,
        row_node: np.ndarray,
        edges: np.ndarray,
        pixels: np.ndarray,
        num_bytes: np.ndarray,
    ) -> np.ndarray:
        """Decide one wave: its rows (canonical positions, ascending) and the edges that arrive with it.

        Args:
            rows: ``int64[r]`` the wave's row positions; ``row_node``: ``int64[r]`` their nodes.
            edges: ``int64[2, E]`` node pairs linked by this wave (every edge with an endpoint first
                seen in it, or any edge set with the same components once the earlier ones are known).
            pixels, num_bytes: ``int64[N]`` per row position (all rows, earlier ones included).

        Returns:
            ``int64[r]`` the representative row of each row (itself when kept).
        """
        if rows.size == 0 and edges.shape[1] == 0:
            return np.empty(0, np.int64)
        row_root = self.find(row_node)
        edge_root = self.find(edges.reshape(-1))
        # The inverse of a sort-based unique, not searchsorted: random lookups into millions cost more.
        roots, local = np.unique(np.concatenate([row_root, edge_root]), return_inverse=True)
        local = local.reshape(-1)
        row_local, edge_local = local[: row_root.size], local[row_root.size :].reshape(2, -1)
        num_edges = edge_local.shape[1]
        graph = coo_matrix(
            (np.ones(num_edges, np.int8), (edge_local[0], edge_local[1])), shape=(roots.size, roots.size)
        )
        num_groups, group = connected_components(graph, directed=False)
        # A component that holds earlier rows keeps them all; new rows go to the best earlier kept row.
        has_old = self.best[roots] >= 0
        old_best = _best_per_group(group[has_old], self.best[roots][has_old], pixels, num_bytes, num_groups)
        row_group = group[row_local]
        new_best = _best_per_group(row_group, rows, pixels, num_bytes, num_groups)
        representative = np.where(old_best >= 0, old_best, new_best)
        # Union by size: each group's new root is its largest member (then the smallest id).
        sizes = self.size[roots]
        order = np.lexsort((roots, -sizes, group))
        head = np.r_[True, group[order][1:] != group[order][:-1]]
        new_root = np.empty(num_groups, np.int64)
        new_root[group[order][head]] = roots[order][head]
        self.parent[roots] = new_root[group]
        self.size[new_root] = np.bincount(group, weights=sizes, minlength=num_groups).astype(np.int64)
        self.best[new_root] = representative
        return representative[row_group]


class DedupState:
    """The decided rows (compact columns, canonical order) and the union-find over their nodes.

    Built over a prefix of waves at once (:meth:`from_waves`: one near-edge search, then a sweep),
    then extended one streamed wave at a time (:meth:`add_wave`: O(N log N) per wave, since the digest
    grouping, the node lookup and the permuted tables touch every decided row).
    """

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self.sha_words = np.empty((0, 4), np.uint64)
        self.phash = np.empty(0, np.uint64)
        self.pixels = np.empty(0, np.int64)
        self.num_bytes = np.empty(0, np.int64)
        self.representative = np.empty(0, np.int64)
        self.group = np.empty(0, np.int64)
        self.values = np.empty(0, np.uint64)  # node pHash by node id
        self.sweep = WaveSweep(0)

    @property
    def num_rows(self) -> int:
        return self.phash.size

    @classmethod
    def from_waves(
        cls,
        sha_words: np.ndarray,
        phash: np.ndarray,
        pixels: np.ndarray,
        num_bytes: np.ndarray,
        wave: np.ndarray,
        max_distance: int,
    ) -> DedupState:
        """Decide every wave of rows given in canonical order, with one near-edge search over all rows.

        Args:
            sha_words: ``uint64[n, 4]`` sha256 per row; phash: ``uint64[n]``; pixels, num_bytes: ``int64[n]``.
            wave: ``int64[n]`` wave ordinal per row, non-decreasing (canonical order).
            max_distance: pHash Hamming distance that links two images.
        """
        state = cls(max_distance)
        state.sha_words, state.phash, state.pixels, state.num_bytes = sha_words, phash, pixels, num_bytes
        num_rows = phash.size
        if num_rows == 0:
            return state
        state.values, node_of_row, state.group = row_nodes(sha_words, phash)
        first_row = np.full(state.values.size, num_rows, np.int64)
        np.minimum.at(first_row, node_of_row, np.arange(num_rows))
        rank = wave[first_row].astype(np.int64)
        edges = near_edges(state.values, max_distance, rank=rank)
        # Edges of weight r arrive with wave r: the sweep adds them in that order.
        weight = np.maximum(rank[edges[0]], rank[edges[1]])
        order = np.argsort(weight, kind="stable")
        edges, weight = edges[:, order], weight[order]
        num_waves = int(wave[-1]) + 1
        row_bounds = np.searchsorted(wave, np.arange(num_waves + 1))
        edge_bounds = np.searchsorted(weight, np.arange(num_waves + 1))
        state.sweep = WaveSweep(state.values.size)
        state.representative = np.empty(num_rows, np.int64)
        for k in range(num_waves):
            lo, hi = row_bounds[k], row_bounds[k + 1]
            state.representative[lo:hi] = state.sweep.step(
                np.arange(lo, hi), node_of_row[lo:hi], edges[:, edge_bounds[k] : edge_bounds[k + 1]], pixels, num_bytes
            )
        return state

    def add_wave(
        self, sha_words: np.ndarray, phash: np.ndarray, pixels: np.ndarray, num_bytes: np.ndarray
    ) -> np.ndarray:
        """Decide one more wave (rows in canonical order) against every decided row; returns its representatives."""
        num_old, num_new = self.num_rows, phash.size
        self.sha_words = np.concatenate([self.sha_words, sha_words])
        self.phash = np.concatenate([self.phash, phash])
        self.pixels = np.concatenate([self.pixels, pixels])
        self.num_bytes = np.concatenate([self.num_bytes, num_bytes])
        # Digest groups over all rows: a byte copy of an earlier image takes that image's node.
        self.group, first = digest_groups(self.sha_words)
        effective = self.phash[first[self.group[num_old:]]]
        num_nodes = self.values.size
        by_value = np.argsort(self.values, kind="stable")
        at = np.minimum(np.searchsorted(self.values[by_value], effective), max(num_nodes - 1, 0))
        known = (self.values[by_value[at]] == effective) if num_nodes else np.zeros(num_new, bool)
        fresh, fresh_of_row = np.unique(effective[~known], return_inverse=True)
        row_node = np.empty(num_new, np.int64)
        row_node[known] = by_value[at[known]]
        row_node[~known] = num_nodes + fresh_of_row.reshape(-1)
        self.values = np.concatenate([self.values, fresh])
        is_new = np.arange(self.values.size) >= num_nodes
        edges = near_edges(self.values, self.max_distance, is_new) if fresh.size else np.empty((2, 0), np.int64)
        self.sweep.grow(self.values.size)
        rows = np.arange(num_old, num_old + num_new)
        representative = self.sweep.step(rows, row_node, edges, self.pixels, self.num_bytes)
        self.representative = np.concatenate([self.representative, representative])
        return representative


def solve_waves(
    sha_words: np.ndarray,
    phash: np.ndarray,
    pixels: np.ndarray,
    num_bytes: np.ndarray,
    wave: np.ndarray,
    max_distance: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(representative, digest_group)`` per row: :meth:`DedupState.from_waves` without the state.

    ``representative`` is the row each row is deduplicated against (itself when kept); rows with one
    ``digest_group`` are byte copies.
    """
    state = DedupState.from_waves(sha_words, phash, pixels, num_bytes, wave, max_distance)
    return state.representative, state.group

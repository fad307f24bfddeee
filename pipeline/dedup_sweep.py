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

from ps3_engine.pipeline.dedup_index import Buffer, NearIndex, SortedRuns
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
        self.parent = np.empty(0, np.int64)
        self.size = np.empty(0, np.int64)
        self.best = np.empty(0, np.int64)
        self.grow(num_nodes)

    def grow(self, num_nodes: int) -> None:
        """Add singleton nodes up to ``num_nodes`` (new pHashes of a streamed wave).

        The arrays keep spare capacity (doubling), so a run of streamed waves copies them O(log N)
        times, not once per wave; entries past the nodes in use are singletons never referenced.
        """
        capacity = self.parent.size
        if num_nodes > capacity:
            grown = max(num_nodes, 2 * capacity)
            self.parent = np.concatenate([self.parent, np.arange(capacity, grown, dtype=np.int64)])
            self.size = np.concatenate([self.size, np.ones(grown - capacity, np.int64)])
            self.best = np.concatenate([self.best, np.full(grown - capacity, -1, np.int64)])

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


def _column(name: str) -> property:
    """A read-only view of the filled part of the buffer ``name`` (one per column of the state)."""
    return property(lambda self: getattr(self, name).view)


class DedupState:
    """The decided rows (compact columns, canonical order) and the union-find over their nodes.

    Built over a prefix of waves at once (:meth:`from_waves`: one near-edge search, then a sweep),
    then extended one streamed wave at a time (:meth:`add_wave`). A streamed wave of B rows costs
    O(B log^2 N) plus its near-duplicate candidates, N being the rows decided so far: the digest,
    node and near-duplicate lookups go through indexes kept as runs (``pipeline/dedup_index.py``),
    built once over the decided rows on the first :meth:`add_wave`, and the columns grow with spare
    capacity. Memory: about 100 bytes per row of columns, and about 50 bytes per distinct pHash of
    indexes once streaming.
    """

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self._sha_words = Buffer(np.uint64, width=4)
        self._phash = Buffer(np.uint64)
        self._pixels = Buffer(np.int64)
        self._num_bytes = Buffer(np.int64)
        self._representative = Buffer(np.int64)
        self._group = Buffer(np.int64)  # digest group per row (equal: byte copies)
        self._group_first = Buffer(np.int64)  # first row of each digest group
        self._node_first = Buffer(np.int64)  # first row of each node
        # The links that formed the components, as rows (first rows of their nodes) with the ordinal
        # of the wave they arrived with: persisted, they let a later dedup rebuild the components
        # after any prefix of waves without searching pairs again (from_decided).
        self._link_rows = Buffer(np.int64, width=2)
        self._link_wave = Buffer(np.int64)
        self.num_waves = 0
        self._values = Buffer(np.uint64)  # node pHash by node id
        self.sweep = WaveSweep(0)
        # Built on the first add_wave (run_dedup's one-shot sweep never needs them).
        self._digests: SortedRuns | None = None
        self._digest_collisions: dict[bytes, int] = {}
        self._nodes: SortedRuns | None = None
        self._near: NearIndex | None = None

    @property
    def num_rows(self) -> int:
        return self._phash.size

    sha_words = _column("_sha_words")
    phash = _column("_phash")
    pixels = _column("_pixels")
    num_bytes = _column("_num_bytes")
    representative = _column("_representative")
    group = _column("_group")
    values = _column("_values")

    @classmethod
    def _of_rows(
        cls, sha_words: np.ndarray, phash: np.ndarray, pixels: np.ndarray, num_bytes: np.ndarray, max_distance: int
    ) -> tuple[DedupState, np.ndarray]:
        """A state holding decided rows' columns, digest groups and nodes (no decisions yet), and the node per row."""
        state = cls(max_distance)
        num_rows = phash.size
        group, group_first = digest_groups(sha_words)
        values, node_of_group = np.unique(phash[group_first], return_inverse=True)
        node_of_row = node_of_group.reshape(-1)[group].astype(np.int64)
        node_first = np.full(values.size, num_rows, np.int64)
        np.minimum.at(node_first, node_of_row, np.arange(num_rows))
        columns = {
            "_sha_words": sha_words,
            "_phash": phash,
            "_pixels": pixels,
            "_num_bytes": num_bytes,
            "_group": group,
            "_group_first": group_first,
            "_values": values,
            "_node_first": node_first,
        }
        for name, data in columns.items():
            setattr(state, name, Buffer.of(data))
        state.sweep = WaveSweep(values.size)
        return state, node_of_row

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
        num_rows = phash.size
        if num_rows == 0:
            return cls(max_distance)
        state, node_of_row = cls._of_rows(sha_words, phash, pixels, num_bytes, max_distance)
        values, first_row = state.values, state._node_first.view
        rank = wave[first_row].astype(np.int64)
        edges = near_edges(values, max_distance, rank=rank)
        # Edges of weight r arrive with wave r: the sweep adds them in that order.
        weight = np.maximum(rank[edges[0]], rank[edges[1]])
        order = np.argsort(weight, kind="stable")
        edges, weight = edges[:, order], weight[order]
        num_waves = int(wave[-1]) + 1
        state._link_rows = Buffer.of(np.ascontiguousarray(first_row[edges].T))
        state._link_wave = Buffer.of(weight)
        state.num_waves = num_waves
        row_bounds = np.searchsorted(wave, np.arange(num_waves + 1))
        edge_bounds = np.searchsorted(weight, np.arange(num_waves + 1))
        representative = np.empty(num_rows, np.int64)
        for k in range(num_waves):
            lo, hi = row_bounds[k], row_bounds[k + 1]
            representative[lo:hi] = state.sweep.step(
                np.arange(lo, hi), node_of_row[lo:hi], edges[:, edge_bounds[k] : edge_bounds[k + 1]], pixels, num_bytes
            )
        state._representative = Buffer.of(representative)
        return state

    @classmethod
    def from_decided(
        cls,
        sha_words: np.ndarray,
        phash: np.ndarray,
        pixels: np.ndarray,
        num_bytes: np.ndarray,
        representative: np.ndarray,
        links: np.ndarray,
        link_wave: np.ndarray,
        num_waves: int,
        max_distance: int,
    ) -> DedupState:
        """The state after ``num_waves`` decided waves, rebuilt from their decisions and links, no pair search.

        Later waves depend only on each component of the decided rows and on its best kept row (the
        sweep looks at nothing else), so the persisted ``representative`` of every row and the links
        that formed the components (:meth:`links`) are enough: sorts and one connected-components
        pass, O(N log N) with a small constant.

        Args:
            sha_words .. num_bytes: the decided rows' columns, canonical order (as :meth:`from_waves`).
            representative: ``int64[n]`` each row's representative (itself when kept).
            links: ``int64[L, 2]`` rows linked by the decided waves; link_wave: ``int64[L]`` the
                ordinal (< ``num_waves``) of the wave each arrived with.

        Raises:
            ValueError: the links do not fit the rows, or a dropped row is not in its
                representative's component (the persisted pieces do not belong together).
        """
        num_rows = phash.size
        if num_rows == 0:
            state = cls(max_distance)
            state.num_waves = num_waves
            return state
        if links.size and (links.min() < 0 or links.max() >= num_rows or link_wave.max() >= num_waves):
            raise ValueError("persisted dedup links point past the decided rows")
        state, node_of_row = cls._of_rows(sha_words, phash, pixels, num_bytes, max_distance)
        state.num_waves = num_waves
        values, node_first = state.values, state._node_first.view
        a, b = node_of_row[links[:, 0]], node_of_row[links[:, 1]]
        graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(values.size, values.size))
        label = connected_components(graph, directed=False)[1]
        # Each component's first row: the sweep's "best" is per component, labelled by it below.
        first_of_label = np.full(label.max() + 1, num_rows, np.int64)
        np.minimum.at(first_of_label, label, node_first)
        component = first_of_label[label[node_of_row]]
        if not np.array_equal(component[representative], component):
            raise ValueError("persisted dedup links disagree with the persisted decisions")
        state._representative = Buffer.of(representative)
        state._link_rows = Buffer.of(np.ascontiguousarray(links, np.int64).reshape(-1, 2))
        state._link_wave = Buffer.of(np.asarray(link_wave, np.int64))
        sweep = state.sweep
        # Every node points at the node of its component's first row (depth 1); that root holds the
        # component's size and its best kept row.
        root = node_of_row[first_of_label[label]]
        sweep.parent[: values.size] = root
        sweep.size[: values.size] = np.bincount(root, minlength=values.size)
        kept = np.flatnonzero(representative == np.arange(num_rows))
        best = _best_per_group(component[kept], kept, pixels, num_bytes, num_rows)
        is_root = root == np.arange(values.size)
        sweep.best[: values.size] = np.where(is_root, best[node_first], -1)
        return state

    def links(self) -> tuple[np.ndarray, np.ndarray]:
        """``(int64[L, 2] linked rows, int64[L] wave ordinal)``: what :meth:`from_decided` takes back."""
        return self._link_rows.view, self._link_wave.view

    def _build_indexes(self) -> None:
        """Index the rows decided so far (once, O(N log N)); later waves add to the indexes."""
        self._digests, self._digest_collisions = SortedRuns(), {}
        self._add_digests(np.arange(self._group_first.size), self._group_first.view)
        self._nodes = SortedRuns()
        self._nodes.add(self.values, np.arange(self.values.size))
        self._near = NearIndex(self.max_distance)
        self._near.add(self.values, np.arange(self.values.size))

    def _add_digests(self, groups: np.ndarray, first_rows: np.ndarray) -> None:
        """Index new digest groups by their sha256's first word; first-word collisions go to a dict."""
        assert self._digests is not None
        words = self.sha_words[first_rows]
        taken = self._digests.find(words[:, 0]) >= 0
        _, first_of_word = np.unique(words[:, 0], return_index=True)
        repeated = np.ones(groups.size, bool)
        repeated[first_of_word] = False
        collide = taken | repeated
        self._digests.add(words[~collide, 0], groups[~collide])
        for index in np.flatnonzero(collide).tolist():
            self._digest_collisions[words[index].tobytes()] = int(groups[index])

    def _find_digests(self, words: np.ndarray) -> np.ndarray:
        """Group of each distinct digest ``uint64[n, 4]`` already decided, -1 where none (exact, all words)."""
        assert self._digests is not None
        group = self._digests.find(words[:, 0])
        found = group >= 0
        held = self.sha_words[self._group_first.view[group[found]]]
        mismatch = np.flatnonzero(found)[~np.all(held == words[found], axis=1)]
        group[mismatch] = -1
        if self._digest_collisions:
            # Rare: distinct digests sharing a first word (about n^2 / 2^65 of them).
            for index in np.flatnonzero(group < 0).tolist():
                group[index] = self._digest_collisions.get(words[index].tobytes(), -1)
        return group

    def add_wave(
        self, sha_words: np.ndarray, phash: np.ndarray, pixels: np.ndarray, num_bytes: np.ndarray
    ) -> np.ndarray:
        """Decide one more wave (rows in canonical order) against every decided row; returns its representatives."""
        if self._near is None:
            self._build_indexes()
        assert self._nodes is not None and self._near is not None
        num_old, num_new = self.num_rows, phash.size
        self._sha_words.append(sha_words)
        self._phash.append(phash)
        self._pixels.append(pixels)
        self._num_bytes.append(num_bytes)
        # Digest groups: a byte copy of an earlier image joins that image's group (and takes its node).
        local_group, local_first = digest_groups(np.asarray(sha_words, np.uint64).reshape(-1, 4))
        group_of_local = self._find_digests(self.sha_words[num_old + local_first])
        fresh_groups = np.flatnonzero(group_of_local < 0)
        group_of_local[fresh_groups] = self._group_first.size + np.arange(fresh_groups.size)
        self._group_first.append(num_old + local_first[fresh_groups])
        self._add_digests(group_of_local[fresh_groups], num_old + local_first[fresh_groups])
        row_group = group_of_local[local_group]
        self._group.append(row_group)
        effective = self.phash[self._group_first.view[row_group]]
        # Nodes: a pHash seen before is that node; the others are new nodes, linked to the old ones
        # through the near index and to each other by one search over the wave's new hashes.
        num_nodes = self.values.size
        row_node = self._nodes.find(effective)
        unknown = row_node < 0
        fresh, fresh_of_row = np.unique(effective[unknown], return_inverse=True)
        fresh_of_row = fresh_of_row.reshape(-1)
        fresh_ids = num_nodes + np.arange(fresh.size)
        row_node[unknown] = fresh_ids[fresh_of_row]
        edges = np.empty((2, 0), np.int64)
        if fresh.size:
            query, old = self._near.query(fresh)
            inner = near_edges(fresh, self.max_distance) + num_nodes
            edges = np.concatenate([np.stack([fresh_ids[query], old]), inner], axis=1)
            self._values.append(fresh)
            self._nodes.add(fresh, fresh_ids)
            self._near.add(fresh, fresh_ids)
            first = np.full(fresh.size, num_old + num_new, np.int64)
            np.minimum.at(first, fresh_of_row, num_old + np.flatnonzero(unknown))
            self._node_first.append(first)
        node_first = self._node_first.view
        self._link_rows.append(np.stack([node_first[edges[0]], node_first[edges[1]]], axis=1))
        self._link_wave.append(np.full(edges.shape[1], self.num_waves, np.int64))
        self.num_waves += 1
        self.sweep.grow(self.values.size)
        rows = np.arange(num_old, num_old + num_new)
        representative = self.sweep.step(rows, row_node, edges, self.pixels, self.num_bytes)
        self._representative.append(representative)
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

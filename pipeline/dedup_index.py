"""Indexes over the decided rows of a streamed dedup, so that one more wave costs about its own size.

The streaming gate (:meth:`ps3_engine.pipeline.dedup_sweep.DedupState.add_wave`) decides a wave of
B rows against the N rows decided before it. Sorting all N rows again for every wave would cost
O(N log N) per wave, O(K N log N) over a run of K waves. These indexes use the logarithmic method
(Bentley and Saxe, "Decomposable searching problems I: static-to-dynamic transformation",
J. Algorithms 1980): the indexed items live in O(log N) static runs of geometrically decreasing size,
a query asks every run, a new batch becomes a run of its own, and runs of similar size are merged, so
each item is re-sorted O(log N) times over the whole run. A wave then costs O(B log^2 N) plus the
near-duplicate candidates it verifies.

:class:`SortedRuns` maps distinct uint64 keys to int64 values (exact lookup: sha256 first words,
node pHashes). :class:`NearIndex` finds, for query hashes, every indexed hash within Hamming distance
k, by multi-index hashing (Greene, Parnas and Yao, "Multi-index hashing for information retrieval",
FOCS 1994; Norouzi, Punjani and Fleet, "Fast exact search in Hamming space with multi-index hashing",
TPAMI 2014): the 64 bits are cut into m contiguous substrings with radii r_i, sum(r_i + 1) = k + 1,
so two hashes within k bits are within r_i bits on at least one substring i (pigeonhole). Each run
holds its hashes sorted by each substring; a query probes every substring value within r_i of its
own (sum over j <= r_i of C(w_i, j) probes of a w_i-bit substring) and verifies the run members
found there. Nothing is skipped: the search is exact. Each run picks m for its own size (more,
shorter substrings for small runs; m = 3 of ~21 bits for tens of millions at k = 4).

Cost caveat: a probe's candidates are the run members sharing that substring value. For uniform
hashes that is S / 2^w per probe; hashes of near-identical images (blank pages, logos) concentrate in
few values, and a query among them verifies every member of its buckets. The offline search
(``pipeline/near_dup.py``) splits such groups recursively; here they cost their size per query.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb, log2

import numpy as np

from ps3_engine.pipeline.near_dup import sort_keys

# Query rows per probe batch and candidate pairs verified per batch (bound the temporary arrays).
PROBE_BATCH = 4_000_000
PAIR_BATCH = 4_000_000


class Buffer:
    """A numpy array that grows by appending (capacity doubles: amortised O(1) per appended row).

    ``view`` is the filled prefix; a view taken before an append keeps its old contents.
    """

    def __init__(self, dtype: np.dtype | type, width: int | None = None, data: np.ndarray | None = None) -> None:
        tail = () if width is None else (width,)
        self._data = np.empty((16, *tail), dtype) if data is None else data
        self.size = 0 if data is None else data.shape[0]

    @classmethod
    def of(cls, data: np.ndarray) -> Buffer:
        """A buffer whose filled part is ``data`` (not copied until the first append)."""
        return cls(data.dtype, data=data)

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.size]

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, self._data.dtype)
        if not values.shape[0]:
            return  # the wrapped array may be read-only (Arrow's): nothing to write
        need = self.size + values.shape[0]
        if need > self._data.shape[0]:
            grown = np.empty((max(need, 2 * self._data.shape[0], 16), *self._data.shape[1:]), self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : need] = values
        self.size = need


def _merge_due(sizes: list[int]) -> bool:
    # Merge while the older run is at most twice the newer one: sizes then at least double from one
    # run to the next older one, so there are O(log N) runs and each item is merged O(log N) times.
    return len(sizes) >= 2 and sizes[-2] <= 2 * sizes[-1]


class _Runs:
    """Items (``uint64`` values with ``int64`` ids) held as static runs merged by the logarithmic method.

    Subclasses say how one run is built (:meth:`_build`); every run has ``values`` and ``ids``.
    """

    def __init__(self) -> None:
        self._runs: list = []

    def __len__(self) -> int:
        return sum(run.values.size for run in self._runs)

    @property
    def num_runs(self) -> int:
        return len(self._runs)

    def _build(self, values: np.ndarray, ids: np.ndarray) -> _SortedRun | _NearRun:
        raise NotImplementedError

    def add(self, values: np.ndarray, ids: np.ndarray) -> None:
        """Index ``values`` (``uint64[n]``) under ``ids`` (``int64[n]``)."""
        values = np.asarray(values, np.uint64)
        if not values.size:
            return
        self._runs.append(self._build(values, np.asarray(ids, np.int64)))
        while _merge_due([run.values.size for run in self._runs]):
            old, new = self._runs[-2:]
            merged = self._build(np.concatenate([old.values, new.values]), np.concatenate([old.ids, new.ids]))
            self._runs[-2:] = [merged]


class _SortedRun:
    """One run of :class:`SortedRuns`: keys sorted, with their ids."""

    def __init__(self, values: np.ndarray, ids: np.ndarray) -> None:
        # Stable sort: on two concatenated sorted runs timsort finds them, so a merge is linear.
        order = np.argsort(values, kind="stable")
        self.values, self.ids = values[order], ids[order]


class SortedRuns(_Runs):
    """Exact map from distinct ``uint64`` keys to ``int64`` ids, as sorted runs (logarithmic method).

    Keys must be distinct from each other and from every key held (the caller ensures it).
    """

    def _build(self, values: np.ndarray, ids: np.ndarray) -> _SortedRun:
        return _SortedRun(values, ids)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """``int64[n]`` the id of each key, -1 where the key is not held."""
        keys = np.asarray(keys, np.uint64)
        out = np.full(keys.size, -1, np.int64)
        for run in self._runs:
            at = np.minimum(np.searchsorted(run.values, keys), run.values.size - 1)
            hit = run.values[at] == keys
            out[hit] = run.ids[at[hit]]
        return out


@lru_cache(maxsize=64)
def _flip_patterns(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit XOR mask with at most ``radius`` bits set (``uint64``, the 0 mask first)."""
    masks = [sum(1 << bit for bit in bits) for count in range(radius + 1) for bits in combinations(range(width), count)]
    return np.array(masks, np.uint64)


def substrings(num: int, max_distance: int) -> list[tuple[int, int, int]]:
    """``(shift, width, radius)`` of ``num`` contiguous substrings of 64 bits with sum(radius + 1) = k + 1.

    Raises:
        ValueError: ``num`` is not in ``1..k + 1`` (a substring with no radius would never match).
    """
    if not 1 <= num <= max_distance + 1:
        raise ValueError(f"{num} substrings for Hamming distance {max_distance}: need 1..{max_distance + 1}")
    slack = [(max_distance + 1) // num + (1 if i < (max_distance + 1) % num else 0) for i in range(num)]
    # The spare bits go to the substrings of smallest radius (last): a wider substring has smaller
    # buckets, and one of radius 0 is probed once, not sum_j C(w, j) times.
    widths = [64 // num + (1 if i >= num - 64 % num else 0) for i in range(num)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return [(int(s), w, r - 1) for s, w, r in zip(shifts, widths, slack, strict=True)]


# Relative cost of verifying one candidate (gather, XOR, popcount, compress) against one step of a
# binary search, measured on numpy 2.x here; probes into a run whose substrings are direct-addressed
# cost about one step.
CANDIDATE_COST = 8.0


def _direct(size: int, width: int) -> bool:
    """Whether a run of ``size`` hashes addresses a ``width``-bit substring directly (offsets per value).

    A table of 2^width offsets replaces the binary search when it costs at most 8 offsets per hash.
    """
    return width <= 26 and (1 << width) <= 8 * max(size, 1)


def probe_cost(size: int, max_distance: int, num: int) -> float:
    """Estimated work of one query against a run of ``size`` uniform hashes cut into ``num`` substrings."""
    cost = 0.0
    for _, width, radius in substrings(num, max_distance):
        probes = sum(comb(width, j) for j in range(radius + 1))
        step = 1.0 if _direct(size, width) else log2(size + 1) + 1
        cost += probes * (step + CANDIDATE_COST * size / 2.0**width)
    return cost


class _NearRun:
    """One static run: hashes, their ids, and per substring the hashes' order by that substring."""

    def __init__(self, values: np.ndarray, ids: np.ndarray, max_distance: int) -> None:
        self.values, self.ids = values, ids
        num = min(range(1, max_distance + 2), key=lambda m: probe_cost(values.size, max_distance, m))
        self.layout = substrings(num, max_distance)
        # Per substring: the run's positions ordered by the substring, and either the sorted
        # substrings (binary search) or, where cheap, the start of each substring value (direct).
        self.keys: list[np.ndarray | None] = []
        self.offsets: list[np.ndarray | None] = []
        self.order: list[np.ndarray] = []
        index_type = np.int32 if values.size < 2**31 else np.int64
        for shift, width, _ in self.layout:
            key = self._key(values, shift, width)
            order, sorted_key = sort_keys(key, width)
            self.order.append(order.astype(index_type))
            if _direct(values.size, width):
                counts = np.bincount(key, minlength=1 << width)
                self.offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(index_type))
                self.keys.append(None)
            else:
                self.keys.append(sorted_key.astype(key.dtype))
                self.offsets.append(None)

    @staticmethod
    def _key(values: np.ndarray, shift: int, width: int) -> np.ndarray:
        key = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1 if width < 64 else (1 << 64) - 1)
        # Keys are stored (and probed) in the narrowest type: searchsorted would otherwise copy the
        # whole run to a common type on every call.
        return key.astype(np.uint32) if width <= 32 else key

    def query(self, values: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
        """``(query index, id)`` of every pair within ``max_distance`` (a pair may repeat)."""
        found_q, found_id = [], []
        for (shift, width, radius), keys, offsets, order in zip(
            self.layout, self.keys, self.offsets, self.order, strict=True
        ):
            patterns = _flip_patterns(width, radius).astype(np.uint32 if width <= 32 else np.uint64)
            step = max(1, PROBE_BATCH // patterns.size)
            for start in range(0, values.size, step):
                chunk = values[start : start + step]
                probes = (self._key(chunk, shift, width)[:, None] ^ patterns[None, :]).reshape(-1)
                if offsets is not None:
                    lo = offsets[probes]
                    count = offsets[probes + 1] - lo
                else:
                    lo = np.searchsorted(keys, probes, "left")
                    count = np.searchsorted(keys, probes, "right") - lo
                hit = np.flatnonzero(count)
                if not hit.size:
                    continue
                query_of_hit = hit // patterns.size + start
                self._verify(values, query_of_hit, lo[hit], count[hit], order, max_distance, found_q, found_id)
        if not found_q:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(found_q), np.concatenate(found_id)

    def _verify(
        self,
        values: np.ndarray,
        query: np.ndarray,
        lo: np.ndarray,
        count: np.ndarray,
        order: np.ndarray,
        max_distance: int,
        found_q: list[np.ndarray],
        found_id: list[np.ndarray],
    ) -> None:
        """Check the candidates of each hit bucket (``count`` members from sorted position ``lo``)."""
        ends = np.cumsum(count)
        first = 0
        while first < count.size:
            done = int(ends[first - 1]) if first else 0
            last = max(first + 1, int(np.searchsorted(ends, done + PAIR_BATCH, "right")))
            c = count[first:last]
            offsets = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            members = order[np.repeat(lo[first:last], c) + offsets]
            q = np.repeat(query[first:last], c)
            close = np.bitwise_count(self.values[members] ^ values[q]) <= max_distance
            found_q.append(q[close])
            found_id.append(self.ids[members[close]])
            first = last


class NearIndex(_Runs):
    """Exact Hamming-radius search over indexed ``uint64`` hashes, as runs (logarithmic method)."""

    def __init__(self, max_distance: int) -> None:
        super().__init__()
        self.max_distance = max_distance

    def _build(self, values: np.ndarray, ids: np.ndarray) -> _NearRun:
        return _NearRun(values, ids, self.max_distance)

    def query(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(query index int64[P], id int64[P])``: every indexed hash within ``max_distance`` of a query.

        Each such pair is listed at least once (exact); a pair may be listed more than once.
        """
        values = np.asarray(values, np.uint64)
        parts = [run.query(values, self.max_distance) for run in self._runs]
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate([q for q, _ in parts]), np.concatenate([i for _, i in parts])

"""Bounded-memory helpers for planning: an occurrence index over item refs and ordered prefetching.

Planning 10M URLs must not hold 10M Python strings or dicts in the driver. Item ids are
``sha256(ref, occurrence)`` (:func:`ps3_engine.stages.crawl.item_id_for`), so the planner has to know how
often each ref was seen before; :class:`OccurrenceIndex` answers that from 8-byte fingerprints kept in
sorted NumPy runs (about 8 bytes per distinct ref, plus a dict entry per repeated ref only).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def ref_fingerprint(ref: str) -> int:
    """64-bit fingerprint of a ref. Deterministic across processes (Python's ``hash`` is salted per run)."""
    return int.from_bytes(hashlib.blake2b(ref.encode(), digest_size=8).digest(), "little")


class OccurrenceIndex:
    """How many times each ref was seen before, in the order refs are offered.

    Distinct fingerprints live in sorted ``uint64`` runs that are merged when two neighbours reach a
    similar size (a log-structured set: O(log n) runs, amortised O(log n) copies per fingerprint).
    Counts are kept only for fingerprints seen at least twice. Two refs whose 64-bit fingerprints collide
    (about 3e-6 for 10M distinct refs) share a counter: their ids stay distinct and deterministic, as the
    id hashes the ref itself; only the occurrence number differs from an exact count.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._repeats: dict[int, int] = {}  # fingerprint -> occurrences so far, for fingerprints seen >= 2 times

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def _seen(self, fingerprints: np.ndarray) -> np.ndarray:
        # Searched in sorted order: consecutive searches then walk the run's memory in one direction,
        # which halves the cost per search once the largest run outgrows the CPU caches (~1M refs).
        order = np.argsort(fingerprints)
        ordered = fingerprints[order]
        found_ordered = np.zeros(len(fingerprints), dtype=bool)
        for run in self._runs:
            position = np.minimum(np.searchsorted(run, ordered), len(run) - 1)
            found_ordered |= run[position] == ordered
        found = np.empty_like(found_ordered)
        found[order] = found_ordered
        return found

    def occurrences(self, refs: list[str]) -> list[int]:
        """Occurrence number of each ref (0 for its first appearance ever), updating the index.

        Args:
            refs: a batch of refs, in plan order; later batches continue the count.
        """
        fingerprints = [ref_fingerprint(ref) for ref in refs]
        seen = self._seen(np.asarray(fingerprints, dtype=np.uint64)).tolist()
        new: set[int] = set()
        result = []
        for fingerprint, before in zip(fingerprints, seen, strict=True):
            if before or fingerprint in new:
                count = self._repeats.get(fingerprint, 1)
                self._repeats[fingerprint] = count + 1
                result.append(count)
            else:
                new.add(fingerprint)
                result.append(0)
        if new:
            self._add(np.sort(np.fromiter(new, dtype=np.uint64, count=len(new))))
        return result

    def _add(self, run: np.ndarray) -> None:
        self._runs.append(run)
        while len(self._runs) >= 2 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            top = self._runs.pop()
            self._runs[-1] = np.sort(np.concatenate([self._runs[-1], top]), kind="stable")


_DONE = object()


def ordered_prefetch(producers: Iterable[Callable[[], Iterator[T]]], ahead: int, depth: int = 2) -> Iterator[T]:
    """Run up to ``ahead`` producers at once in threads; yield their items in producer order.

    Each producer fills a queue of at most ``depth`` items, so memory is bounded by ``ahead * depth``
    items whatever the number of producers. Reading and decoding (pyarrow, S3 requests) release the
    GIL, so several input files are read and parsed while the driver consumes the first. An exception
    in a producer is raised here, at its place in the order.
    """
    producers = iter(producers)
    pending: list[tuple[queue.Queue, threading.Thread]] = []
    stop = threading.Event()

    def run(make: Callable[[], Iterator[T]], out: queue.Queue) -> None:
        try:
            for item in make():
                while not stop.is_set():
                    try:
                        out.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            out.put((exc, None))
            return
        out.put((None, _DONE))

    def start_next() -> bool:
        make = next(producers, None)
        if make is None:
            return False
        out: queue.Queue = queue.Queue(maxsize=depth)
        thread = threading.Thread(target=run, args=(make, out), daemon=True, name="plan-prefetch")
        thread.start()
        pending.append((out, thread))
        return True

    try:
        while len(pending) < ahead and start_next():
            pass
        while pending:
            out, thread = pending[0]
            while True:
                error, item = out.get()
                if error is not None:
                    raise error
                if item is _DONE:
                    break
                yield item
            thread.join()
            pending.pop(0)
            start_next()
    finally:
        stop.set()
        for out, thread in pending:
            while thread.is_alive():  # drain so a blocked producer sees ``stop`` and exits
                with contextlib.suppress(queue.Empty):
                    out.get(timeout=0.1)

"""Counted, never fatal: corpus rows (and regions) a training job skips, with a reason per skip.

A data transform runs in Ray Data tasks, far from the training loop that reports metrics, so the counts
live in a small named Ray actor that belongs to the launch (``SkipCounter``, created by the launcher
and named after the run). Transforms add to it fire-and-forget; workers read its totals when they report,
so ``skipped_rows`` and ``skipped/<reason>`` appear in the run's metrics. Without a counter (tests,
notebooks, ``iter_samples``) the counts stay in this process (``local_totals``).

Counts are per sample attempt: an image upsampled into three copies whose box is bad counts three times,
but is logged once per process.
"""

from __future__ import annotations

import collections
import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

NAMESPACE = "ps3-engine-training"
MAX_LOGGED_IDS = 10_000  # per process: enough to log each bad row once on a real shard, bounded memory
SKIPPED_ROWS = "skipped_rows"
SKIPPED_PREFIX = "skipped/"
DROPPED_PREFIX = "dropped_regions/"

_local: collections.Counter[str] = collections.Counter()
_logged: set[tuple[str, str]] = set()


class SkipCounter:
    """The Ray actor holding a launch's counts (``reason -> n``; region drops under ``dropped_regions/``)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


@functools.lru_cache(maxsize=8)
def _counter(counter_name: str) -> Any:
    """The actor behind ``counter_name`` (``<actor name>#<launch nonce>``), looked up once per process.

    The nonce makes each launch's key new, so a worker process that Ray reuses across launches never
    keeps the handle of an earlier launch's (killed) actor of the same name.
    """
    import ray

    return ray.get_actor(counter_name.split("#", 1)[0], namespace=NAMESPACE)


def _add(counter_name: str | None, key: str) -> None:
    if counter_name is None:
        _local[key] += 1
        return
    _counter(counter_name).add.remote(key)


def record_skip(counter_name: str | None, reason: str, item_id: str, message: str) -> None:
    """Count one skipped sample under ``reason`` (a short slug) and log it once per (item, reason) and process."""
    _add(counter_name, SKIPPED_PREFIX + reason)
    if (item_id, reason) not in _logged and len(_logged) < MAX_LOGGED_IDS:
        _logged.add((item_id, reason))
        logger.warning("skipping %s (%s): %s", item_id, reason, message)


def record_drop(counter_name: str | None, reason: str) -> None:
    """Count one region left out of a still usable row (e.g. a degenerate box)."""
    _add(counter_name, DROPPED_PREFIX + reason)


def with_total(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` plus ``skipped_rows``, the sum of the ``skipped/`` entries."""
    total = sum(n for key, n in counts.items() if key.startswith(SKIPPED_PREFIX))
    return {**counts, SKIPPED_ROWS: total}


def local_totals() -> dict[str, int]:
    """The counts made in this process without a counter actor."""
    return with_total(dict(_local))


def counter_totals(counter_name: str | None) -> dict[str, int]:
    """The totals of the launch's counter (or of this process without one), with ``skipped_rows``."""
    if counter_name is None:
        return local_totals()
    import ray

    return with_total(ray.get(_counter(counter_name).totals.remote()))

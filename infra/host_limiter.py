"""Per-host politeness across the cluster (issue 15 item 5): one limiter actor shared by all crawl workers.

Each worker's :class:`~ps3_engine.infra.http.GuardedHttpClient` limits a host per process; with N workers a
host would see N times the configured concurrency and rate. :class:`HostLimiterActor` holds the host's
slots and request spacing once for the whole cluster: a worker asks it for a lease before a request and
returns the lease when the response is discarded. It is a named, detached Ray actor looked up by name,
so every worker of a job shares one instance; it ends itself after :data:`IDLE_EXIT_S` without requests.

Cost: two actor calls per request (about a millisecond each on one node), small next to a download.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

LIMITER_NAME_PREFIX = "ps3-host-limiter"
IDLE_EXIT_S = 600.0  # a limiter with no request for this long ends itself


class HostLimiterActor:
    """Cluster-wide per-host concurrency (``concurrency`` leases) and rate (``rate`` leases per second).

    Async actor: waiting callers park on the event loop, so one actor serves many workers.
    """

    def __init__(self, concurrency: int, rate: float | None) -> None:
        self._concurrency = concurrency
        self._rate = rate
        self._slots: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(concurrency))
        self._next_start: dict[str, float] = defaultdict(float)  # rate: earliest start of the next request
        self.granted = 0
        self._last_used = time.monotonic()
        self._reaper: asyncio.Task | None = None

    async def _exit_when_idle(self) -> None:
        """Detached (it must outlive the worker that created it), so it ends itself after a quiet spell."""
        import ray

        while time.monotonic() - self._last_used < IDLE_EXIT_S or any(s.locked() for s in self._slots.values()):
            await asyncio.sleep(IDLE_EXIT_S / 10)
        ray.actor.exit_actor()

    async def acquire(self, host: str) -> None:
        """Wait for a slot of ``host`` and, with a rate, for its next start time (evenly spaced requests)."""
        self._last_used = time.monotonic()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._exit_when_idle())
        await self._slots[host].acquire()
        if self._rate:
            now = time.monotonic()
            start = max(now, self._next_start[host])
            self._next_start[host] = start + 1.0 / self._rate
            if start > now:
                await asyncio.sleep(start - now)
        self.granted += 1

    async def release(self, host: str) -> None:
        self._last_used = time.monotonic()
        self._slots[host].release()

    async def stats(self) -> dict[str, Any]:
        return {"granted": self.granted, "concurrency": self._concurrency, "rate": self._rate}


LIMITER_NAMESPACE = "ps3-engine"


def get_or_create_limiter(run_key: str, concurrency: int, rate: float | None) -> Any:
    """The run's limiter actor handle (created by the first worker that asks, found by name after).

    Args:
        run_key: names the actor, so that runs on one cluster do not share (a run root's fingerprint).
    """
    import ray

    actor = ray.remote(HostLimiterActor).options(
        name=f"{LIMITER_NAME_PREFIX}-{run_key}",
        # An explicit namespace: every worker of the job finds it, and Ray does not warn (on the user's
        # console) about a detached actor in an anonymous namespace.
        namespace=LIMITER_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",  # a non-detached actor dies with the worker that created it, mid-crawl
        num_cpus=0,
        max_concurrency=1000,
    )
    return actor.remote(concurrency, rate)


class SharedHostLimits:
    """Client side of the limiter: blocking ``acquire``/``release`` used by the HTTP client's threads."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    def acquire(self, host: str) -> None:
        import ray

        ray.get(self._actor.acquire.remote(host))

    def release(self, host: str) -> None:
        import ray

        ray.get(self._actor.release.remote(host))

    def stats(self) -> dict[str, Any]:
        """Leases granted so far and the limits, for tests and logs."""
        import ray

        return ray.get(self._actor.stats.remote())


def cluster_limits(concurrency: int, rate: float | None) -> SharedHostLimits | None:
    """Shared limits for a crawl worker running inside a Ray job; ``None`` in a plain process or the driver.

    All workers of one Ray job with the same limits share one actor, so ``per_host_concurrency`` and
    ``per_host_rate`` hold for the cluster rather than per worker.
    """
    try:
        import ray
    except ImportError:  # the in-process executor needs no Ray
        return None
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    job = ray.get_runtime_context().get_job_id()
    return SharedHostLimits(get_or_create_limiter(f"{job}-{concurrency}-{rate}", concurrency, rate))

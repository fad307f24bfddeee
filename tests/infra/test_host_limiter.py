"""Politeness across the cluster (issue 15 item 5): one host, several Ray workers, one shared limit."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ps3_engine.infra.host_limiter import SharedHostLimits, cluster_limits, get_or_create_limiter
from ps3_engine.infra.http import GuardedHttpClient, HttpSettings

NUM_WORKERS = 3
THREADS_PER_WORKER = 4
URLS_PER_WORKER = 8
CONCURRENCY = 2


class _Host(ThreadingHTTPServer):
    """A loopback host that records how many requests it serves at once and when each one starts."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.starts: list[float] = []


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host: _Host = self.server  # type: ignore[assignment]
        with host.lock:
            host.in_flight += 1
            host.max_in_flight = max(host.max_in_flight, host.in_flight)
            host.starts.append(time.monotonic())
        try:
            time.sleep(0.15)  # a slow download: overlapping requests would be seen
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        finally:
            with host.lock:
                host.in_flight -= 1

    def log_message(self, *args) -> None:
        pass


def _crawl_worker(base: str, worker: int, actor) -> int:
    """One crawl worker process: its own client and download threads, as a crawl actor has."""
    settings = HttpSettings(per_host_concurrency=CONCURRENCY, allow_private_addresses=True, max_retries=0)
    client = GuardedHttpClient(settings, SharedHostLimits(actor) if actor is not None else None)
    urls = [f"{base}/w{worker}/{i}.jpg" for i in range(URLS_PER_WORKER)]
    with ThreadPoolExecutor(THREADS_PER_WORKER) as pool:
        return sum(result.status == 200 for result in pool.map(client.fetch, urls))


@pytest.fixture
def host():
    server = _Host()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_workers(ray, host: _Host, actor) -> int:
    base = f"http://127.0.0.1:{host.server_address[1]}"
    remote = ray.remote(num_cpus=0)(_crawl_worker)
    return sum(ray.get([remote.remote(base, w, actor) for w in range(NUM_WORKERS)]))


def test_per_worker_limits_alone_multiply_with_the_workers(ray_local, host):
    """The problem being solved: each worker keeps its own limit, so the host sees several times it."""
    assert _run_workers(ray_local, host, None) == NUM_WORKERS * URLS_PER_WORKER
    assert host.max_in_flight > CONCURRENCY


def test_a_hosts_concurrency_and_rate_hold_across_all_workers(ray_local, host):
    rate = 8.0  # requests/s for the whole cluster: 24 requests need 2.9 s, the concurrency cap alone 1.8 s
    actor = get_or_create_limiter(uuid.uuid4().hex, CONCURRENCY, rate)
    assert _run_workers(ray_local, host, actor) == NUM_WORKERS * URLS_PER_WORKER
    assert host.max_in_flight == CONCURRENCY
    starts = sorted(host.starts)
    assert starts[-1] - starts[0] >= 0.9 * (len(starts) - 1) / rate  # slack for arrival jitter only
    stats = ray_local.get(actor.stats.remote())
    assert stats["granted"] == NUM_WORKERS * URLS_PER_WORKER
    ray_local.kill(actor)


def _worker_uses_cluster_limits(concurrency: int) -> bool:
    limits = cluster_limits(concurrency, None)
    if limits is None:
        return False
    limits.acquire("h")
    limits.release("h")
    return True


def test_crawl_workers_of_one_job_share_a_limiter_and_the_driver_has_none(ray_local):
    assert cluster_limits(3, None) is None  # the driver (and the in-process executor) keep per-process limits
    remote = ray_local.remote(num_cpus=0)(_worker_uses_cluster_limits)
    assert ray_local.get([remote.remote(3) for _ in range(3)]) == [True] * 3
    job = ray_local.get_runtime_context().get_job_id()
    actor = get_or_create_limiter(f"{job}-3-None", 3, None)  # the same named actor the workers found
    assert ray_local.get(actor.stats.remote())["granted"] == 3  # one actor served all three workers
    ray_local.kill(actor)

"""Guarded HTTP fetching for the crawler.

What a crawler running inside a cloud cluster needs, in one client:

* connection pooling (one ``urllib3.PoolManager`` per client, thread-safe);
* connect/read timeouts plus a total deadline per fetch (enforced while the body streams too), and a
  cap on body size (checked against ``Content-Length`` first, then while streaming);
* retries with exponential backoff and jitter for transient failures, honouring ``Retry-After`` on
  429/503 (seconds or an HTTP date) up to a ceiling;
* per-host concurrency (a semaphore held until the body is read or discarded, so it bounds downloads,
  not just requests) and a per-host request rate (a token bucket);
* redirects followed by hand, so every hop goes through the same address guard, with loop detection;
* an address guard that refuses private, loopback, link-local and other non-global addresses unless
  explicitly allowed. The check runs *inside* the connection's connect step, on the very addresses the
  socket connects to, so DNS rebinding between a check and the connect cannot slip through. Link-local
  and cloud-metadata addresses need their own opt-in: allowing in-cluster (private) sources must not
  let a redirect reach ``169.254.169.254`` and its instance credentials;
* credentials in URLs (``http://user:secret@host/``) never reach a stored URL, message or log line.

Failures surface as :class:`FetchError` with a short machine ``reason``, whether it is ``transient``
(worth retrying in a later run), and a human message.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

logger = logging.getLogger(__name__)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_AFTER_STATUSES = frozenset({429, 503})
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

# Most bytes one body read asks for. Reads use ``read1`` (one socket receive, whatever has arrived), so
# this bounds memory per read, not latency: the total deadline is checked after every receive.
BODY_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class HttpSettings:
    """Knobs of :class:`GuardedHttpClient`; the crawl stage builds this from its validated config."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 120.0
    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 60.0
    max_bytes: int = 64 * 1024 * 1024
    max_redirects: int = 5
    per_host_concurrency: int = 8
    per_host_rate: float | None = None
    allow_private_addresses: bool = False
    allow_link_local_addresses: bool = False
    user_agent: str = "ps3-engine/0.1 (+research crawler; honours X-Robots-Tag noai)"


@dataclass(frozen=True)
class FetchResult:
    url: str
    final_url: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int
    elapsed_s: float


@dataclass
class FetchError(Exception):
    """A fetch that ended without a usable body."""

    reason: str
    message: str
    transient: bool
    attempts: int = 1
    status: int | None = None
    category: str = "failed"

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class BlockedAddressError(OSError):
    """The host resolved only to addresses the guard refuses."""


# Cloud instance-metadata endpoints outside the link-local ranges: Alibaba Cloud's sits in the shared
# 100.64.0.0/10 space, AWS's IPv6 one in unique-local space. Link-local ranges hold the others.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# The user-info of a URL: everything between "://" and the authority's last "@" (a password may hold "@").
USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")


def _unwrapped(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a socket really reaches: IPv4-mapped and NAT64-embedded IPv4 addresses are unwrapped."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in NAT64_PREFIX:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 is unwrapped first)."""
    ip = _unwrapped(address)
    return ip.is_global and not ip.is_multicast and ip not in METADATA_ADDRESSES


def is_link_local_or_metadata(address: str) -> bool:
    ip = _unwrapped(address)
    return ip.is_link_local or ip in METADATA_ADDRESSES


def address_allowed(address: str, *, allow_private: bool, allow_link_local: bool) -> bool:
    """The guard's verdict on one resolved address.

    Link-local and metadata targets need ``allow_link_local`` whatever ``allow_private`` says; other
    non-public targets (loopback, RFC 1918, unique-local) need ``allow_private``.
    """
    if is_link_local_or_metadata(address):
        return allow_link_local
    return allow_private or is_public_address(address)


def redact_url(text: str) -> str:
    """``text`` with the user-info part of every URL in it removed (``http://u:p@h/`` -> ``http://h/``)."""
    return USERINFO.sub("", text)


def _guarded_new_conn(self: HTTPConnection) -> socket.socket:
    """Resolve, refuse non-public addresses unless allowed, then connect to an accepted address."""
    host = self._dns_host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, self.port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(self.host, self, exc) from exc
    allowed = [
        info
        for info in infos
        if address_allowed(
            info[4][0], allow_private=self.allow_private_addresses, allow_link_local=self.allow_link_local_addresses
        )
    ]
    if not allowed:
        addresses = sorted({info[4][0] for info in infos})
        link_local = any(is_link_local_or_metadata(a) for a in addresses)
        hint = " (link-local/cloud metadata: needs allow_link_local_addresses)" if link_local else ""
        raise BlockedAddressError(f"{self.host} resolves only to non-public addresses {addresses}{hint}")
    last_error: OSError | None = None
    for family, socktype, proto, _, sockaddr in allowed:
        sock = socket.socket(family, socktype, proto)
        try:
            for option in self.socket_options or ():
                sock.setsockopt(*option)
            if isinstance(self.timeout, int | float):
                sock.settimeout(self.timeout)
            sock.connect(sockaddr)
            return sock
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from exc
        except OSError as exc:
            sock.close()
            last_error = exc
    raise NewConnectionError(self, f"failed to connect to {self.host}: {last_error}")


def _pool_classes(allow_private: bool, allow_link_local: bool) -> dict[str, type[HTTPConnectionPool]]:
    conn_attrs = {
        "_new_conn": _guarded_new_conn,
        "allow_private_addresses": allow_private,
        "allow_link_local_addresses": allow_link_local,
    }
    http_conn = type("GuardedHTTPConnection", (HTTPConnection,), conn_attrs)
    https_conn = type("GuardedHTTPSConnection", (HTTPSConnection,), conn_attrs)
    return {
        "http": type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


class TokenBucket:
    """A per-host request rate limit: ``rate`` tokens per second, bursts up to ``capacity``."""

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = capacity or max(1.0, rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                wait_s = (1.0 - self._tokens) / self.rate
            time.sleep(wait_s)


@dataclass
class _HostLimits:
    semaphore: threading.BoundedSemaphore
    bucket: TokenBucket | None = None
    retry_after_until: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _is_ascii_digits(value: str) -> bool:
    """True for a non-empty run of ASCII ``0-9``.

    Header values are decoded as latin-1, and ``str.isdigit()`` alone also accepts characters such as
    ``"²"`` that ``int()``/``float()`` then reject with a ValueError.
    """
    return value.isascii() and value.isdigit()


def _content_length(headers: Mapping[str, str]) -> int | None:
    """The declared ``Content-Length`` (header lookup is case-insensitive), or None if absent/bad."""
    declared = headers.get("content-length", "")
    return int(declared) if _is_ascii_digits(declared) else None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if _is_ascii_digits(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _root_cause(exc: BaseException) -> BaseException:
    """Unwrap urllib3's wrapping (``reason`` / ``args[1]`` / ``__cause__``) to the original error."""
    seen: set[int] = set()
    current: BaseException = exc
    while id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "reason", None)
        if isinstance(inner, BaseException):
            current = inner
            continue
        nested = [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        if nested:
            current = nested[-1]
            continue
        if current.__cause__ is not None:
            current = current.__cause__
            continue
        break
    return current


def classify_exception(exc: BaseException) -> tuple[str, bool]:
    """Map a transport exception to ``(reason, transient)``."""
    root = _root_cause(exc)
    if isinstance(root, BlockedAddressError):
        return "blocked_address", False
    if isinstance(root, http.client.LineTooLong | http.client.HTTPException) and (
        "header" in str(root).lower() or isinstance(root, http.client.LineTooLong)
    ):
        return "bad_headers", False
    if isinstance(exc, LocationParseError | ValueError):
        return "invalid_url", False
    if isinstance(exc, SSLError) or root.__class__.__name__.startswith("SSL"):
        return "tls_error", False
    if isinstance(exc, NameResolutionError) or isinstance(root, socket.gaierror):
        return "dns_failure", True
    if isinstance(exc, NewConnectionError) and not isinstance(root, TimeoutError):
        return "connection_error", True  # urllib3 subclasses it from ConnectTimeoutError
    if isinstance(exc, ReadTimeoutError | ConnectTimeoutError) or isinstance(root, TimeoutError):
        return "timeout", True
    if isinstance(root, http.client.IncompleteRead) or "IncompleteRead" in repr(root):
        return "incomplete_body", True
    if isinstance(exc, NewConnectionError | ProtocolError | HTTPError | OSError):
        return "connection_error", True
    return "fetch_error", False


MAX_DRAIN_BYTES = 1024 * 1024


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Return the connection to the pool only with its body consumed (keep-alive would desync)."""
    declared = _content_length(response.headers)
    try:
        if getattr(response, "body_consumed", False):
            response.release_conn()
        elif declared is not None and declared <= MAX_DRAIN_BYTES:
            response.drain_conn()
            response.release_conn()
        else:
            response.close()
    except (HTTPError, OSError):
        response.close()


def _split_url(url: str) -> SplitResult:
    """``urlsplit`` that turns a malformed URL (e.g. ``http://[::1``) into a permanent FetchError."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise FetchError("invalid_url", f"malformed URL {url!r}: {exc}", transient=False) from exc


def _cap_read_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Lower the socket timeout for the next body read, so a stalled read cannot outlive the deadline.

    urllib3 has no per-read timeout API; the response's connection exposes its socket, and the next
    request on that pooled connection sets its own read timeout again (``HTTPConnection.getresponse``).
    """
    sock = getattr(response.connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


class GuardedHttpClient:
    """Thread-safe HTTP GET with guards, limits and retries. One instance per worker process."""

    def __init__(self, settings: HttpSettings, shared_limits: Any | None = None) -> None:
        self.settings = settings
        # Cluster-wide per-host leases (infra/host_limiter.SharedHostLimits): ``acquire(host)``/``release(host)``.
        self._shared_limits = shared_limits
        self._pool = urllib3.PoolManager(
            num_pools=256,
            maxsize=settings.per_host_concurrency,
            headers={"User-Agent": settings.user_agent, "Accept": "image/*,*/*;q=0.5"},
        )
        self._pool.pool_classes_by_scheme = _pool_classes(
            settings.allow_private_addresses, settings.allow_link_local_addresses
        )
        self._hosts: dict[str, _HostLimits] = {}
        self._hosts_lock = threading.Lock()
        self._random = random.Random()

    def close(self) -> None:
        self._pool.clear()

    def _limits(self, host: str) -> _HostLimits:
        with self._hosts_lock:
            limits = self._hosts.get(host)
            if limits is None:
                rate = self.settings.per_host_rate
                limits = _HostLimits(
                    semaphore=threading.BoundedSemaphore(self.settings.per_host_concurrency),
                    bucket=TokenBucket(rate) if rate else None,
                )
                self._hosts[host] = limits
            return limits

    def _backoff_s(self, attempt: int) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * (2 ** (attempt - 1)))
        return ceiling * (0.5 + 0.5 * self._random.random())

    def fetch(
        self,
        url: str,
        header_filter: Callable[[Mapping[str, str]], FetchError | None] | None = None,
    ) -> FetchResult:
        """GET ``url`` following redirects. ``header_filter`` may veto a response before its body.

        Credentials in ``url`` or a redirect's ``Location`` are never sent (urllib3 ignores user-info) and
        are removed from the result's URLs and from error messages.
        """
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                result = self._fetch_once(url, started, attempts, header_filter)
                return replace(result, url=redact_url(result.url), final_url=redact_url(result.final_url))
            except FetchError as error:
                error.attempts = attempts
                error.message = redact_url(error.message)
                delay = getattr(error, "retry_after_s", None)
                if not error.transient or attempts > self.settings.max_retries:
                    raise
                if delay is None:
                    delay = self._backoff_s(attempts)
                elif delay > self.settings.max_retry_after_s:
                    error.message += (
                        f" (Retry-After {delay:.0f}s exceeds the {self.settings.max_retry_after_s:.0f}s cap)"
                    )
                    raise
                if time.monotonic() - started + delay > self.settings.total_timeout_s:
                    raise
                logger.debug("retrying %s in %.2fs after %s", redact_url(url), delay, error.reason)
                time.sleep(delay)

    def _fetch_once(
        self,
        url: str,
        started: float,
        attempt: int,
        header_filter: Callable[[Mapping[str, str]], FetchError | None] | None,
    ) -> FetchResult:
        visited: list[str] = []
        current = url
        while True:
            parts = _split_url(current)
            if parts.scheme.lower() not in ("http", "https"):
                raise FetchError("invalid_url", f"unsupported URL scheme in {current!r}", transient=False)
            if current in visited:
                raise FetchError("redirect_loop", f"redirect loop: {' -> '.join([*visited, current])}", False)
            if len(visited) > self.settings.max_redirects:
                raise FetchError("too_many_redirects", f"more than {self.settings.max_redirects} redirects", False)
            visited.append(current)
            # Leaving this block (redirect, error or result) discards the response and frees the host's
            # concurrency slot, so the next hop (often the same host) or a retry never waits on itself.
            with self._open(current, parts.hostname or "") as response:
                if 300 <= response.status < 400:
                    location = response.headers.get("Location", "").strip()
                    if not location:
                        raise FetchError(
                            "bad_redirect",
                            f"HTTP {response.status} from {current} without a Location header",
                            transient=False,
                            status=response.status,
                        )
                    if response.status in REDIRECT_STATUSES:
                        current = self._redirect_target(current, location)
                        continue
                return self._finish(url, current, response, started, attempt, header_filter)

    @staticmethod
    def _redirect_target(current: str, location: str) -> str:
        """Resolve a ``Location`` against the current URL; a malformed one is a permanent invalid_url."""
        try:
            return urljoin(current, location)
        except ValueError as exc:
            raise FetchError(
                "invalid_url", f"malformed redirect Location {location!r} from {current}: {exc}", transient=False
            ) from exc

    @contextmanager
    def _open(self, url: str, host: str) -> Iterator[urllib3.BaseHTTPResponse]:
        """Send the GET and yield the response with its headers read and its body not yet.

        The host's concurrency slot is held until the caller is done with the response and it has been
        discarded: the body download is most of a fetch's time on the host, so releasing the slot once
        the headers arrive would let ``per_host_concurrency`` bound requests but not downloads.
        """
        limits = self._limits(host)
        wait_s = limits.retry_after_until - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        if limits.bucket is not None:
            limits.bucket.acquire()
        timeout = urllib3.Timeout(connect=self.settings.connect_timeout_s, read=self.settings.read_timeout_s)
        with limits.semaphore, self._shared_lease(host):
            try:
                response = self._pool.urlopen(
                    "GET", url, redirect=False, retries=False, preload_content=False, timeout=timeout
                )
            except (HTTPError, OSError, ValueError, http.client.HTTPException) as exc:
                reason, transient = classify_exception(exc)
                raise FetchError(reason, f"{type(_root_cause(exc)).__name__}: {_root_cause(exc)}", transient) from exc
            try:
                yield response
            finally:
                _discard(response)

    @contextmanager
    def _shared_lease(self, host: str) -> Iterator[None]:
        """Hold the host's cluster-wide lease (when shared limits are set) for the whole request and body."""
        if self._shared_limits is None:
            yield
            return
        self._shared_limits.acquire(host)
        try:
            yield
        finally:
            self._shared_limits.release(host)

    def _finish(
        self,
        url: str,
        final_url: str,
        response: urllib3.BaseHTTPResponse,
        started: float,
        attempt: int,
        header_filter: Callable[[Mapping[str, str]], FetchError | None] | None,
    ) -> FetchResult:
        status = response.status
        headers = {k.lower(): v for k, v in response.headers.items()}
        if status >= 400 or status < 200:
            error = FetchError(
                f"http_{status}", f"HTTP {status} from {final_url}", status in TRANSIENT_STATUSES, status=status
            )
            if status in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(headers.get("retry-after"))
                error.retry_after_s = retry_after  # type: ignore[attr-defined]
                if retry_after:
                    limits = self._limits(urlsplit(final_url).hostname or "")
                    limits.retry_after_until = max(
                        limits.retry_after_until, time.monotonic() + min(retry_after, self.settings.max_retry_after_s)
                    )
            raise error
        if header_filter is not None:
            vetoed = header_filter(headers)
            if vetoed is not None:
                vetoed.status = status
                raise vetoed
        body = self._read_body(response, headers, final_url, started)
        return FetchResult(url, final_url, status, headers, body, attempt, time.monotonic() - started)

    def _read_body(
        self, response: urllib3.BaseHTTPResponse, headers: Mapping[str, str], url: str, started: float
    ) -> bytes:
        cap = self.settings.max_bytes
        declared = _content_length(headers)
        if declared is not None and declared > cap:
            raise FetchError("too_large", f"Content-Length {declared} exceeds the {cap}-byte cap", False)
        deadline = started + self.settings.total_timeout_s
        deadline_error = FetchError("timeout", f"total deadline {self.settings.total_timeout_s}s exceeded", True)
        chunks: list[bytes] = []
        received = 0
        try:
            while True:
                # ``read1`` returns after one socket receive with whatever has arrived. ``read``/``stream``
                # would block until the whole chunk (or EOF) is in, so a server trickling a sized body
                # just faster than the read timeout could hold a fetch far past its total deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise deadline_error
                # ...and a single stalled receive may not outlast the deadline either.
                _cap_read_timeout(response, min(self.settings.read_timeout_s, remaining))
                chunk = response.read1(BODY_READ_SIZE)
                if not chunk:
                    break
                received += len(chunk)
                if received > cap:
                    raise FetchError("too_large", f"body exceeds the {cap}-byte cap", False)
                chunks.append(chunk)
        except FetchError:
            response.close()
            raise
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            reason, transient = classify_exception(exc)
            if reason == "timeout" and time.monotonic() >= deadline:
                raise deadline_error from exc  # the receive timed out because the deadline capped it
            raise FetchError(reason, f"reading body of {url}: {_root_cause(exc)}", transient) from exc
        response.body_consumed = True  # type: ignore[attr-defined]
        return b"".join(chunks)

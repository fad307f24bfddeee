"""The guarded HTTP client against a real loopback HTTP server whose behaviour is chosen by the path.

Every test builds its own client (per-host limits and Retry-After state live in the client) and tags its
requests with a unique ``id`` query parameter, so the module-scoped server's hit counters never mix tests.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from ps3_engine import infra
from ps3_engine.infra.http import (
    BlockedAddressError,
    FetchError,
    FetchResult,
    GuardedHttpClient,
    HttpSettings,
    TokenBucket,
    classify_exception,
    is_public_address,
    parse_retry_after,
)
from ps3_engine.stages.crawl import CrawlConfig, CrawlStage, HttpConfig

# --------------------------------------------------------------------------------------------------
# The loopback server
# --------------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    """What the server saw, keyed by the request's ``id`` query parameter."""

    base_url: str = ""
    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    inflight: Counter[str] = field(default_factory=Counter)
    max_inflight: Counter[str] = field(default_factory=Counter)
    client_ports: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    outcome: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, **params: object) -> str:
        return f"{self.base_url}{path}" + (f"?{urlencode(params)}" if params else "")

    def count(self, request_id: str) -> int:
        with self.lock:
            return self.hits[request_id]


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ServerState  # set on the subclass built per server

    def log_message(self, *args: object) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _retry_after_value(self, spec: str) -> str:
        if spec.startswith("date+"):
            when = datetime.now(UTC) + timedelta(seconds=float(spec.removeprefix("date+")))
            return email.utils.format_datetime(when, usegmt=True)
        if spec == "superscript2":
            return "\xb2"  # one latin-1 byte; http.client decodes it to "²", which str.isdigit() accepts
        return spec

    # -- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        rid = q.get("id", "")
        state = self.state
        with state.lock:
            state.hits[rid] += 1
            seen = state.hits[rid]
            state.client_ports[rid].append(self.client_address[1])
            state.inflight[rid] += 1
            state.max_inflight[rid] = max(state.max_inflight[rid], state.inflight[rid])
        try:
            self._route(path, q, seen)
            state.outcome[rid] = "completed"
        except (BrokenPipeError, ConnectionResetError):
            state.outcome[rid] = "aborted"
            self.close_connection = True
        finally:
            with state.lock:
                state.inflight[rid] -= 1

    def _route(self, path: str, q: dict[str, str], seen: int) -> None:
        rid = q.get("id", "")
        if path == "/ok":
            return self._send(200, b"hello world", {"Content-Type": "text/plain", "X-Echo": "Mixed-Case"})
        if path == "/bytes":
            return self._send(200, b"x" * int(q["n"]))
        if path == "/status":
            return self._send(int(q["code"]), b"status body")
        if path == "/flaky":  # fails on the first hit only
            if seen == 1:
                headers = {"Retry-After": self._retry_after_value(q["retry_after"])} if "retry_after" in q else {}
                return self._send(int(q["code"]), b"try later", headers)
            return self._send(200, b"recovered")
        if path == "/retry-after":  # always fails with the given Retry-After
            return self._send(int(q["code"]), b"busy", {"Retry-After": self._retry_after_value(q["value"])})
        if path == "/redirect":
            return self._send(int(q.get("code", "302")), b"", {"Location": q["to"]})
        if path.startswith("/chain/"):
            n = int(path.removeprefix("/chain/"))
            if n == 0:
                return self._send(200, b"end of chain")
            base = q["base"]
            return self._send(302, b"", {"Location": f"/chain/{n - 1}?base={base}&id={base}-{n - 1}"})
        if path in ("/loop-a", "/loop-b"):
            other = "/loop-b" if path == "/loop-a" else "/loop-a"
            return self._send(302, b"", {"Location": f"{other}?id={rid}"})
        if path == "/slow-headers":
            time.sleep(float(q["delay"]))
            return self._send(200, b"late")
        if path == "/slow-body":  # headers at once, the body after a pause
            body = b"y" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:10])
            self.wfile.flush()
            time.sleep(float(q["delay"]))
            self.wfile.write(body[10:])
            return None
        if path == "/trickle":  # one byte per interval, with or without Content-Length
            n, interval = int(q["n"]), float(q["interval"])
            chunked = q.get("chunked") == "1"
            self.send_response(200)
            self.send_header("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(n))
            self.end_headers()
            for _ in range(n):
                self.wfile.write(b"1\r\nz\r\n" if chunked else b"z")
                self.wfile.flush()
                time.sleep(interval)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            return None
        if path == "/declared-too-big":
            self.send_response(200)
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            self.wfile.write(b"\0" * 1024)
            self.close_connection = True
            return None
        if path == "/chunked":
            n, piece = int(q["n"]), 1000
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, n, piece):
                data = b"c" * min(piece, n - start)
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return None
        if path == "/until-close":  # no Content-Length, no chunking: the body ends when the socket closes
            n, piece = int(q["n"]), 64 * 1024
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for start in range(0, n, piece):
                self.wfile.write(b"u" * min(piece, n - start))
            return None
        if path == "/gzip-bomb":
            body = gzip.compress(b"\0" * int(q["n"]), compresslevel=9)
            return self._send(200, body, {"Content-Encoding": "gzip"})
        if path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"t" * 10)
            self.close_connection = True
            return None
        if path == "/many-headers":
            self.send_response(200)
            for i in range(150):
                self.send_header(f"X-Filler-{i}", "x" * 20)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/long-header":
            self.send_response(200)
            self.send_header("X-Long", "x" * 70_000)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/robots":
            body = b"image bytes"
            self.send_response(200)
            self.send_header("X-Robots-Tag", q["tag"])
            self.send_header("Content-Length", q.get("declared", str(len(body))))
            self.end_headers()
            self.wfile.write(body)
            if "declared" in q:
                self.close_connection = True
            return None
        if path == "/hold":  # in flight for ``delay`` before the headers
            time.sleep(float(q["delay"]))
            return self._send(200, b"held")
        if path == "/hold-body":  # headers at once, then in flight for ``delay`` while the body trickles
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"he")
            self.wfile.flush()
            time.sleep(float(q["delay"]))
            self.wfile.write(b"ld")
            return None
        return self._send(404, b"no such route")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-response is what several tests do on purpose


@pytest.fixture(scope="module")
def server() -> Iterator[ServerState]:
    state = ServerState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    httpd = QuietServer(("127.0.0.1", 0), handler)
    state.port = httpd.server_address[1]
    state.base_url = f"http://127.0.0.1:{state.port}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


FAST = {
    "connect_timeout_s": 1.0,
    "read_timeout_s": 1.0,
    "total_timeout_s": 10.0,
    "max_retries": 2,
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.05,
    "allow_private_addresses": True,
}


@pytest.fixture
def make_client() -> Iterator:
    clients: list[GuardedHttpClient] = []

    def make(**overrides: object) -> GuardedHttpClient:
        client = GuardedHttpClient(HttpSettings(**{**FAST, **overrides}))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def fetch_error(client: GuardedHttpClient, url: str, **kwargs: object) -> FetchError:
    with pytest.raises(FetchError) as info:
        client.fetch(url, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------------
# Plain responses and status handling
# --------------------------------------------------------------------------------------------------


def test_200_returns_body_headers_and_metadata(server, make_client):
    rid = new_id()
    url = server.url("/ok", id=rid)
    result = make_client().fetch(url)
    assert isinstance(result, FetchResult)
    assert (result.url, result.final_url, result.status, result.body) == (url, url, 200, b"hello world")
    assert result.attempts == 1 and 0 <= result.elapsed_s < 1.0
    assert result.headers["content-type"] == "text/plain"  # header names are lower-cased
    assert result.headers["x-echo"] == "Mixed-Case"  # values are not
    assert server.count(rid) == 1


def test_404_is_permanent_and_not_retried(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_retries=3), server.url("/status", code=404, id=rid))
    assert (error.reason, error.transient, error.status, error.attempts) == ("http_404", False, 404, 1)
    assert error.category == "failed"
    assert str(error).startswith("http_404: HTTP 404 from ")
    assert server.count(rid) == 1


def test_500_is_retried_then_fails_as_transient(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_retries=2), server.url("/status", code=500, id=rid))
    assert (error.reason, error.transient, error.status, error.attempts) == ("http_500", True, 500, 3)
    assert server.count(rid) == 3  # the first try plus max_retries


def test_transient_500_recovers_on_retry(server, make_client):
    rid = new_id()
    result = make_client().fetch(server.url("/flaky", code=500, id=rid))
    assert (result.status, result.body, result.attempts) == (200, b"recovered", 2)
    assert server.count(rid) == 2


def test_no_retries_when_max_retries_is_zero(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_retries=0), server.url("/status", code=502, id=rid))
    assert (error.reason, error.transient, error.attempts) == ("http_502", True, 1)
    assert server.count(rid) == 1


# --------------------------------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------------------------------


def test_503_retry_after_seconds_is_honoured(server, make_client):
    rid = new_id()
    started = time.monotonic()
    result = make_client(backoff_base_s=0.001, backoff_max_s=0.001).fetch(
        server.url("/flaky", code=503, retry_after=1, id=rid)
    )
    waited = time.monotonic() - started
    assert (result.status, result.body, result.attempts) == (200, b"recovered", 2)
    assert server.count(rid) == 2
    assert waited >= 1.0 and result.elapsed_s >= 1.0  # the backoff alone would have been ~1 ms
    assert waited < 2.5


def test_429_retry_after_http_date_is_honoured(server, make_client):
    rid = new_id()
    started = time.monotonic()
    # The server sends now + 2 s as an HTTP date; whole-second resolution leaves a wait of (1, 2] s.
    result = make_client(backoff_base_s=0.001, backoff_max_s=0.001).fetch(
        server.url("/flaky", code=429, retry_after="date+2", id=rid)
    )
    waited = time.monotonic() - started
    assert (result.status, result.attempts) == (200, 2)
    assert server.count(rid) == 2
    assert 0.95 <= waited < 3.0


@pytest.mark.parametrize("value", ["30", "date+3600"])
def test_retry_after_beyond_the_cap_fails_at_once(server, make_client, value):
    rid = new_id()
    client = make_client(max_retries=3, max_retry_after_s=1.0)
    started = time.monotonic()
    error = fetch_error(client, server.url("/retry-after", code=503, value=value, id=rid))
    assert time.monotonic() - started < 0.5
    assert (error.reason, error.transient, error.attempts, error.status) == ("http_503", True, 1, 503)
    assert "exceeds the 1s cap" in error.message
    assert server.count(rid) == 1


def test_retry_after_beyond_the_total_deadline_fails_at_once(server, make_client):
    rid = new_id()
    client = make_client(max_retries=3, total_timeout_s=0.5)
    started = time.monotonic()
    error = fetch_error(client, server.url("/retry-after", code=429, value=2, id=rid))
    assert time.monotonic() - started < 0.4
    assert (error.reason, error.attempts) == ("http_429", 1)
    assert server.count(rid) == 1


def test_retry_after_also_delays_the_next_request_to_that_host(server, make_client):
    client = make_client(max_retries=0)
    error = fetch_error(client, server.url("/retry-after", code=503, value=1, id=new_id()))
    assert error.reason == "http_503"
    started = time.monotonic()
    assert client.fetch(server.url("/ok", id=new_id())).status == 200
    assert time.monotonic() - started >= 0.8  # the host asked for 1 s of quiet


def test_hostile_retry_after_header_does_not_escape_as_value_error(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_retries=0), server.url("/retry-after", code=503, value="superscript2", id=rid))
    assert error.reason == "http_503"


# --------------------------------------------------------------------------------------------------
# Redirects
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_is_followed(server, make_client, code):
    rid, target_id = new_id(), new_id()
    url = server.url("/redirect", code=code, to=f"/ok?id={target_id}", id=rid)
    result = make_client().fetch(url)
    assert (result.status, result.body, result.attempts) == (200, b"hello world", 1)
    assert result.url == url
    assert result.final_url == server.url("/ok", id=target_id)
    assert server.count(rid) == 1 and server.count(target_id) == 1


def test_redirect_chain_up_to_the_limit_is_followed(server, make_client):
    rid = new_id()
    result = make_client(max_redirects=3).fetch(server.url("/chain/3", base=rid, id=f"{rid}-3"))
    assert result.body == b"end of chain"
    assert result.final_url == server.url("/chain/0", base=rid, id=f"{rid}-0")


def test_too_many_redirects(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_redirects=3), server.url("/chain/4", base=rid, id=f"{rid}-4"))
    assert (error.reason, error.transient, error.attempts) == ("too_many_redirects", False, 1)
    assert server.count(f"{rid}-1") == 1
    assert server.count(f"{rid}-0") == 0  # the hop past the limit is never requested


def test_redirect_loop_is_detected(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_redirects=10), server.url("/loop-a", id=rid))
    assert (error.reason, error.transient, error.attempts) == ("redirect_loop", False, 1)
    assert "/loop-a" in error.message and "/loop-b" in error.message and " -> " in error.message
    assert server.count(rid) == 2  # loop-a and loop-b once each, then the repeat is caught


def test_redirect_to_an_unsupported_scheme(server, make_client):
    error = fetch_error(make_client(), server.url("/redirect", to="ftp://example.com/x", id=new_id()))
    assert (error.reason, error.transient) == ("invalid_url", False)


def test_malformed_redirect_location_is_a_fetch_error(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_retries=2), server.url("/redirect", to="http://[::1", id=rid))
    assert (error.reason, error.transient, error.attempts) == ("invalid_url", False, 1)
    assert server.count(rid) == 1


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308, 300])
def test_redirect_without_location_is_a_fetch_error(server, make_client, code):
    rid = new_id()
    error = fetch_error(make_client(max_retries=2), server.url("/status", code=code, id=rid))
    assert (error.reason, error.transient, error.status, error.attempts) == ("bad_redirect", False, code, 1)
    assert "without a Location header" in error.message
    assert server.count(rid) == 1  # permanent: not retried


# --------------------------------------------------------------------------------------------------
# Timeouts, truncation, size caps, header limits
# --------------------------------------------------------------------------------------------------


def test_read_timeout_waiting_for_headers(server, make_client):
    rid = new_id()
    client = make_client(read_timeout_s=0.3, max_retries=1)
    started = time.monotonic()
    error = fetch_error(client, server.url("/slow-headers", delay=1.5, id=rid))
    assert time.monotonic() - started < 1.2  # two 0.3 s timeouts, not the server's 1.5 s
    assert (error.reason, error.transient, error.attempts) == ("timeout", True, 2)
    assert server.count(rid) == 2


def test_read_timeout_while_streaming_the_body(server, make_client):
    client = make_client(read_timeout_s=0.3, max_retries=0)
    started = time.monotonic()
    error = fetch_error(client, server.url("/slow-body", delay=1.5, id=new_id()))
    assert time.monotonic() - started < 1.0
    assert (error.reason, error.transient) == ("timeout", True)


def test_total_deadline_stops_a_trickling_chunked_body(server, make_client):
    client = make_client(read_timeout_s=1.0, total_timeout_s=0.4, max_retries=0)
    started = time.monotonic()
    error = fetch_error(client, server.url("/trickle", n=30, interval=0.05, chunked=1, id=new_id()))
    assert time.monotonic() - started < 1.0  # the whole body would take 1.5 s
    assert (error.reason, error.transient) == ("timeout", True)
    assert "total deadline" in error.message


def test_total_deadline_stops_a_trickling_sized_body(server, make_client):
    client = make_client(read_timeout_s=1.0, total_timeout_s=0.3, max_retries=0)
    started = time.monotonic()
    error = fetch_error(client, server.url("/trickle", n=12, interval=0.1, id=new_id()))
    assert time.monotonic() - started < 0.8  # the whole body takes 1.2 s
    assert (error.reason, error.transient) == ("timeout", True)
    assert "total deadline" in error.message


def test_total_deadline_caps_a_stalled_body_read(server, make_client):
    # The body stalls for longer than read_timeout_s; the deadline, nearer than that, must win.
    client = make_client(read_timeout_s=1.0, total_timeout_s=0.3, max_retries=0)
    started = time.monotonic()
    error = fetch_error(client, server.url("/slow-body", delay=1.5, id=new_id()))
    assert time.monotonic() - started < 0.7  # not the 1 s read timeout
    assert (error.reason, error.transient) == ("timeout", True)
    assert "total deadline" in error.message


def test_non_ascii_content_length_is_ignored(server, make_client):
    # http.client decodes headers as latin-1: "\xb2" becomes "²", which str.isdigit() accepts but int()
    # rejects. Such a Content-Length counts as absent, so the body is read until the connection closes.
    result = make_client().fetch(server.url("/robots", tag="none", declared="\xb2", id=new_id()))
    assert (result.status, result.body) == (200, b"image bytes")


def test_incomplete_body_is_transient(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_retries=1), server.url("/truncated", id=rid))
    assert (error.reason, error.transient, error.attempts) == ("incomplete_body", True, 2)
    assert server.count(rid) == 2


def test_body_of_exactly_the_cap_is_accepted(server, make_client):
    assert make_client(max_bytes=1000).fetch(server.url("/bytes", n=1000, id=new_id())).body == b"x" * 1000


def test_content_length_over_the_cap_is_refused_before_reading(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_bytes=1000), server.url("/bytes", n=1001, id=rid))
    assert (error.reason, error.transient, error.attempts) == ("too_large", False, 1)
    assert "Content-Length 1001" in error.message
    error = fetch_error(make_client(max_bytes=1_000_000), server.url("/declared-too-big", id=new_id()))
    assert error.reason == "too_large" and "50000000" in error.message
    assert server.count(rid) == 1


@pytest.mark.parametrize("route", ["/chunked", "/until-close"])
def test_body_without_content_length_over_the_cap(server, make_client, route):
    rid = new_id()
    error = fetch_error(make_client(max_bytes=2500), server.url(route, n=5000, id=rid))
    assert (error.reason, error.transient, error.attempts) == ("too_large", False, 1)
    assert "exceeds the 2500-byte cap" in error.message
    assert server.count(rid) == 1
    # the same bodies under the cap come through whole
    assert len(make_client(max_bytes=5000).fetch(server.url(route, n=5000, id=new_id())).body) == 5000


def test_streaming_stops_once_the_cap_is_passed(server, make_client):
    rid = new_id()
    error = fetch_error(make_client(max_bytes=1000), server.url("/until-close", n=64 * 1024 * 1024, id=rid))
    assert error.reason == "too_large"
    deadline = time.monotonic() + 3.0
    while rid not in server.outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.outcome.get(rid) == "aborted"  # the client hung up instead of draining 64 MiB


def test_decompressed_size_counts_against_the_cap(server, make_client):
    error = fetch_error(make_client(max_bytes=1_000_000), server.url("/gzip-bomb", n=20_000_000, id=new_id()))
    assert error.reason == "too_large"


@pytest.mark.parametrize("route", ["/many-headers", "/long-header"])
def test_oversized_response_headers(server, make_client, route):
    rid = new_id()
    error = fetch_error(make_client(max_retries=2), server.url(route, id=rid))
    assert (error.reason, error.transient, error.attempts) == ("bad_headers", False, 1)
    assert server.count(rid) == 1


# --------------------------------------------------------------------------------------------------
# X-Robots-Tag opt-out through the crawl stage's header filter
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def opt_out_filter():
    return CrawlStage(CrawlConfig())._opt_out_filter  # the filter the crawl stage passes to fetch()


@pytest.mark.parametrize("tag", ["noai", "noimageai", "NoAI", "examplebot: noimageai, nofollow"])
def test_opt_out_vetoes_the_response(server, make_client, opt_out_filter, tag):
    rid = new_id()
    error = fetch_error(
        make_client(max_retries=2), server.url("/robots", tag=tag, id=rid), header_filter=opt_out_filter
    )
    assert (error.reason, error.category, error.transient, error.status, error.attempts) == (
        "opt_out",
        "filtered",
        False,
        200,
        1,
    )
    assert tag in error.message
    assert server.count(rid) == 1


def test_other_robots_directives_pass(server, make_client, opt_out_filter):
    result = make_client().fetch(
        server.url("/robots", tag="noindex,nofollow", id=new_id()), header_filter=opt_out_filter
    )
    assert (result.status, result.body) == (200, b"image bytes")


def test_opt_out_can_be_switched_off(server, make_client):
    lenient = CrawlStage(CrawlConfig(honour_opt_out=False))._opt_out_filter
    result = make_client().fetch(server.url("/robots", tag="noai", id=new_id()), header_filter=lenient)
    assert result.body == b"image bytes"


def test_opt_out_veto_comes_before_the_size_cap(server, make_client, opt_out_filter):
    url = server.url("/robots", tag="noai", declared=50_000_000, id=new_id())
    error = fetch_error(make_client(max_bytes=1000), url, header_filter=opt_out_filter)
    assert error.reason == "opt_out"  # decided on headers; the oversized body is never read


def test_header_filter_sees_lower_cased_headers(server, make_client):
    seen: list[dict[str, str]] = []

    def record(headers: Mapping[str, str]) -> None:
        seen.append(dict(headers))

    make_client().fetch(server.url("/ok", id=new_id()), header_filter=record)
    assert len(seen) == 1
    assert seen[0]["x-echo"] == "Mixed-Case" and "X-Echo" not in seen[0]


def test_connection_is_reused_cleanly_after_errors_and_vetoes(server, make_client, opt_out_filter):
    """Keep-alive stays in sync: a 404 body and a vetoed body are drained before the next request."""
    client = make_client(max_retries=0)
    rid = new_id()
    assert client.fetch(server.url("/ok", id=rid)).body == b"hello world"
    assert fetch_error(client, server.url("/status", code=404, id=rid)).reason == "http_404"
    assert fetch_error(client, server.url("/robots", tag="noai", id=rid), header_filter=opt_out_filter).reason == (
        "opt_out"
    )
    assert client.fetch(server.url("/ok", id=rid)).body == b"hello world"
    assert server.count(rid) == 4
    assert len(set(server.client_ports[rid])) == 1  # one pooled connection served all four


# --------------------------------------------------------------------------------------------------
# Address guard, bad URLs, connection failures
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"])
def test_private_targets_are_refused_before_any_request(server, make_client, host):
    rid = new_id()
    client = make_client(allow_private_addresses=False, max_retries=2)
    error = fetch_error(client, f"http://{host}:{server.port}/ok?id={rid}")
    assert (error.reason, error.transient, error.attempts) == ("blocked_address", False, 1)
    assert "non-public" in error.message
    assert server.count(rid) == 0


def test_cloud_metadata_address_is_refused_without_connecting(make_client):
    client = make_client(allow_private_addresses=False, connect_timeout_s=5.0)
    started = time.monotonic()
    error = fetch_error(client, "http://169.254.169.254/latest/meta-data/")
    assert error.reason == "blocked_address"
    assert time.monotonic() - started < 1.0


def test_every_redirect_hop_goes_through_the_guard(server, make_client, monkeypatch):
    # Only the guard's *policy* is swapped (127.0.0.1 counts as public here), so that a loopback server
    # can stand in for a public one; the wiring under test is that the redirect target is checked too.
    monkeypatch.setattr(infra.http, "is_public_address", lambda address: address == "127.0.0.1")
    rid, target_id = new_id(), new_id()
    client = make_client(allow_private_addresses=False)
    assert client.fetch(server.url("/ok", id=new_id())).status == 200
    to = f"http://127.0.0.2:{server.port}/ok?id={target_id}"
    error = fetch_error(client, server.url("/redirect", to=to, id=rid))
    assert error.reason == "blocked_address"  # not connection_error: refused before connecting
    assert server.count(rid) == 1 and server.count(target_id) == 0


def test_dns_failure_is_transient(make_client, monkeypatch):
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    error = fetch_error(make_client(max_retries=1), "http://images.example.test/a.jpg")
    assert (error.reason, error.transient, error.attempts) == ("dns_failure", True, 2)


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        "ftp://example.com/a.jpg",
        "file:///etc/passwd",
        "http://",
        "http:///path-only",
        "http://127.0.0.1:99999/",
        "http://exa mple.com/",
    ],
)
def test_invalid_urls(make_client, url):
    error = fetch_error(make_client(max_retries=2), url)
    assert (error.reason, error.transient, error.attempts) == ("invalid_url", False, 1)


def test_malformed_ipv6_url_is_invalid_url(make_client):
    assert fetch_error(make_client(), "http://[::1/x").reason == "invalid_url"


def test_connection_refused_is_transient(make_client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = fetch_error(make_client(max_retries=1), f"http://127.0.0.1:{port}/")
    assert (error.reason, error.transient, error.attempts) == ("connection_error", True, 2)


# --------------------------------------------------------------------------------------------------
# Per-host limits
# --------------------------------------------------------------------------------------------------


def _fetch_in_parallel(client: GuardedHttpClient, url: str, num_requests: int) -> list[FetchResult]:
    with ThreadPoolExecutor(num_requests) as pool:
        return list(pool.map(lambda _: client.fetch(url), range(num_requests)))


def test_per_host_concurrency_limit(server, make_client):
    rid = new_id()
    client = make_client(per_host_concurrency=2)
    results = _fetch_in_parallel(client, server.url("/hold", delay=0.2, id=rid), 6)
    assert [r.body for r in results] == [b"held"] * 6
    assert server.count(rid) == 6
    assert server.max_inflight[rid] == 2  # never more than the limit, and the limit was reached


def test_per_host_concurrency_limit_covers_the_body(server, make_client):
    rid = new_id()
    client = make_client(per_host_concurrency=2)
    results = _fetch_in_parallel(client, server.url("/hold-body", delay=0.3, id=rid), 6)
    assert [r.body for r in results] == [b"held"] * 6
    assert server.max_inflight[rid] <= 2


def test_redirects_and_retries_do_not_wait_on_their_own_slot(server, make_client):
    # With one slot per host, a hop or a retry that still held the previous response's slot would
    # deadlock; the fetch runs in a thread so a regression fails the test instead of hanging it.
    client = make_client(per_host_concurrency=1)
    rid = new_id()
    with ThreadPoolExecutor(1) as pool:
        redirected = pool.submit(client.fetch, server.url("/chain/3", base=rid, id=f"{rid}-3")).result(timeout=5)
        retried = pool.submit(client.fetch, server.url("/flaky", code=500, id=new_id())).result(timeout=5)
    assert redirected.body == b"end of chain"
    assert (retried.body, retried.attempts) == (b"recovered", 2)


def test_per_host_rate_limit(server, make_client):
    rate, num_requests = 10.0, 15  # the bucket holds max(1, rate) = 10 tokens at the start
    client = make_client(per_host_rate=rate)
    url = server.url("/ok", id=new_id())
    started = time.monotonic()
    for _ in range(num_requests):
        client.fetch(url)
    elapsed = time.monotonic() - started
    expected = (num_requests - rate) / rate
    assert expected * 0.9 <= elapsed < expected + 1.0


def test_token_bucket_bursts_then_paces():
    bucket = TokenBucket(rate=20.0, capacity=3)
    started = time.monotonic()
    for _ in range(3):
        bucket.acquire()
    assert time.monotonic() - started < 0.05  # the burst is free
    for _ in range(4):
        bucket.acquire()
    assert 0.18 <= time.monotonic() - started < 0.6  # then 4 tokens at 20/s


def test_token_bucket_default_capacity():
    assert TokenBucket(rate=0.5).capacity == 1.0
    assert TokenBucket(rate=7.0).capacity == 7.0


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("8.8.8.8", True),
        ("0.0.0.0", False),
        ("192.168.1.1", False),
        ("172.16.0.1", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("fc00::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Wed, 01 May 2024 12:00:30 GMT", 30.0),
        ("Wed, 01 May 2024 12:00:30 -0000", 30.0),  # a zone-less date counts as UTC
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past: no wait, never negative
        ("garbage", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_non_ascii_digit():
    assert parse_retry_after("\xb2", now=NOW) is None


def test_parse_retry_after_defaults_to_the_current_time():
    in_ten = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert 8.0 <= parse_retry_after(in_ten) <= 10.0


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BlockedAddressError("only private"), ("blocked_address", False)),
        (ProtocolError("Connection aborted.", BlockedAddressError("only private")), ("blocked_address", False)),
        (ProtocolError("Connection aborted.", http.client.LineTooLong("header line")), ("bad_headers", False)),
        (LocationParseError("http://[x"), ("invalid_url", False)),
        (NameResolutionError("h.test", None, socket.gaierror(-2, "unknown")), ("dns_failure", True)),
        (NewConnectionError(None, "refused"), ("connection_error", True)),
        (ConnectTimeoutError(None, "connect timed out"), ("timeout", True)),
        (ReadTimeoutError(None, "http://h.test/", "read timed out"), ("timeout", True)),
        (TimeoutError("timed out"), ("timeout", True)),
        (ConnectionResetError("reset"), ("connection_error", True)),
        (RuntimeError("surprise"), ("fetch_error", False)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_classify_exception(exc, expected):
    assert classify_exception(exc) == expected


def test_classify_incomplete_read():
    wrapped = ProtocolError("Connection broken", http.client.IncompleteRead(b"abc", 10))
    assert classify_exception(wrapped) == ("incomplete_body", True)


def test_crawl_http_config_defaults_match_http_settings():
    assert HttpConfig().to_settings() == HttpSettings()


def test_fetch_error_defaults_and_str():
    error = FetchError("http_404", "HTTP 404 from x", transient=False)
    assert str(error) == "http_404: HTTP 404 from x"
    assert (error.attempts, error.status, error.category) == (1, None, "failed")


# --------------------------------------------------------------------------------------------------
# Issue 14: link-local / cloud-metadata targets and credentials in URLs
# --------------------------------------------------------------------------------------------------


def test_redirect_to_cloud_metadata_is_blocked_even_with_private_addresses_allowed(server, make_client):
    rid = new_id()
    client = make_client(allow_private_addresses=True, max_retries=3, connect_timeout_s=5.0)
    started = time.monotonic()
    error = fetch_error(client, server.url("/redirect", to="http://169.254.169.254/latest/meta-data/", id=rid))
    assert (error.reason, error.transient, error.attempts) == ("blocked_address", False, 1)
    assert "allow_link_local_addresses" in error.message
    assert time.monotonic() - started < 1.0  # refused before connecting, and not retried
    assert server.count(rid) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 written as one decimal number
        "http://0xa9fea9fe/latest/meta-data/",  # ... and in hex
        "http://[::ffff:169.254.169.254]/latest/meta-data/",  # IPv4-mapped IPv6
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64-embedded IPv4
        "http://169.254.170.2/v2/credentials",  # AWS ECS task credentials
        "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud metadata (shared address space)
        "http://[fd00:ec2::254]/latest/meta-data/",  # AWS IPv6 metadata (unique-local space)
        "http://[fe80::1]/",  # IPv6 link-local
    ],
)
def test_sibling_spellings_of_metadata_and_link_local_targets_are_blocked(make_client, url):
    client = make_client(allow_private_addresses=True, max_retries=3, connect_timeout_s=5.0)
    started = time.monotonic()
    error = fetch_error(client, url)
    assert (error.reason, error.transient, error.attempts) == ("blocked_address", False, 1)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("address", "private", "link_local", "allowed"),
    [
        ("169.254.169.254", True, False, False),
        ("169.254.169.254", True, True, True),
        ("fe80::1", False, True, True),
        ("10.0.0.5", True, False, True),
        ("10.0.0.5", False, True, False),
        ("8.8.8.8", False, False, True),
        ("::ffff:169.254.169.254", True, False, False),
    ],
)
def test_address_policy_keeps_link_local_behind_its_own_option(address, private, link_local, allowed):
    from ps3_engine.infra.http import address_allowed

    assert address_allowed(address, allow_private=private, allow_link_local=link_local) is allowed


def test_credentials_in_urls_are_never_returned_or_put_in_messages(server, make_client):
    client = make_client(allow_private_addresses=True)
    secret_url = server.url("/ok", id=new_id()).replace("://", "://user:p@ss:w0rd@", 1)
    result = client.fetch(secret_url)
    assert "w0rd" not in result.url and "w0rd" not in result.final_url
    assert result.final_url.startswith(server.base_url)
    missing = server.url("/status", code=404, id=new_id()).replace("://", "://user:w0rd@", 1)
    assert "w0rd" not in fetch_error(client, missing).message
    to = server.url("/ok", id=new_id()).replace("://", "://user:w0rd@", 1)
    redirected = client.fetch(server.url("/redirect", to=to, id=new_id()))
    assert "w0rd" not in redirected.final_url and redirected.status == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://u:p@h/x.jpg", "http://h/x.jpg"),
        ("https://u:p@ss@h:8080/x?a=b@c", "https://h:8080/x?a=b@c"),
        ("HTTP 404 from http://tok@h/x (after http://a:b@g/y)", "HTTP 404 from http://h/x (after http://g/y)"),
        ("http://h/x@y", "http://h/x@y"),
    ],
)
def test_redact_url_removes_user_info_only(text, expected):
    from ps3_engine.infra.http import redact_url

    assert redact_url(text) == expected

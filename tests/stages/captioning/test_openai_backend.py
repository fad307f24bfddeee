"""The OpenAI-compatible captioner against a real loopback chat-completions server (a fake we own).

The server validates every request body (model, one user turn with data-URL JPEG images before the
prompt, max_tokens), counts hits and concurrent requests, and answers per the scenario a test sets.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_caption, run_crawl, run_segment
from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.stages.caption import caption_id_for
from ps3_engine.stages.captioning.backends import CaptionRequest, SamplingSettings
from ps3_engine.stages.captioning.openai_backend import OpenAICaptioner, OpenAISettings
from ps3_engine.stages.captioning.prompts import PS3_GLOBAL_PROMPT, PS3_LOCAL_PROMPT

MODEL = "fake/qwen2-vl"
SECRET = "sk-test-0123456789abcdef-do-not-log"
KEY_ENV = "PS3_TEST_CAPTION_API_KEY"
LOCAL_TEXT = "The second image is a close-up of a white square with tiny dark letters on it."
GLOBAL_TEXT = "A smooth colour gradient with a few round shapes and two small white patches."


@dataclass
class Call:
    """One request as the server saw it."""

    index: int
    body: dict
    images: list[bytes]
    sizes: list[tuple[int, int]]
    prompt: str
    authorization: str | None


Reply = tuple[int, dict[str, str], bytes]


def completion(text: str, finish_reason: str = "stop", prompt_tokens: int = 0, completion_tokens: int = 0) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    ).encode()


def answer(call: Call) -> Reply:
    """The default scenario: a deterministic caption; token counts derived from the request."""
    text = LOCAL_TEXT if len(call.images) == 2 else GLOBAL_TEXT
    return 200, {}, completion(text, "stop", 100 * len(call.images) + 7, len(text.split()))


def validation_problems(body: dict, expected_model: str) -> tuple[list[str], list[bytes], str]:
    """Check the request shape a chat-completions server expects; returns problems, images, prompt."""
    problems: list[str] = []
    if body.get("model") != expected_model:
        problems.append(f"model {body.get('model')!r}")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        problems.append(f"max_tokens {body.get('max_tokens')!r}")
    messages = body.get("messages")
    if not (isinstance(messages, list) and len(messages) == 1 and messages[0].get("role") == "user"):
        return [*problems, f"messages {messages!r:.200}"], [], ""
    content = messages[0].get("content") or []
    images, prompt = [], ""
    for position, part in enumerate(content):
        last = position == len(content) - 1
        if part.get("type") == "text" and last:
            prompt = part.get("text", "")
        elif part.get("type") == "image_url" and not last:
            url = part["image_url"]["url"]
            if not url.startswith("data:image/jpeg;base64,"):
                problems.append(f"image url {url[:40]!r}")
                continue
            images.append(base64.b64decode(url.split(",", 1)[1], validate=True))
        else:
            problems.append(f"content part {position} of type {part.get('type')!r} (last: {last})")
    if not images or not prompt:
        problems.append(f"{len(images)} images, prompt {prompt!r:.40}")
    return problems, images, prompt


@dataclass
class FakeChatServer:
    url: str
    model: str = MODEL
    scenario: Callable[[Call], Reply] = answer
    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, path: str, raw: bytes, authorization: str | None) -> Reply:
        if path != "/v1/chat/completions":
            return 404, {}, b'{"error": "not found"}'
        try:
            body = json.loads(raw)
            problems, images, prompt = validation_problems(body, self.model)
            sizes = [Image.open(io.BytesIO(data)).size for data in images]
        except Exception as exc:
            problems, body, images, prompt, sizes = [f"unreadable request: {exc}"], {}, [], "", []
        with self.lock:
            call = Call(len(self.calls), body, images, sizes, prompt, authorization)
            self.calls.append(call)
            self.problems.extend(problems)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if problems:
                return 422, {}, json.dumps({"error": problems}).encode()
            return self.scenario(call)
        finally:
            with self.lock:
                self.in_flight -= 1


def _handler(server: FakeChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, headers, body = server.handle(self.path, raw, self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def fake_openai() -> Iterator[FakeChatServer]:
    state = FakeChatServer(url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def jpeg_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def local_request(request_id: str) -> CaptionRequest:
    """A two-image request whose JPEG bytes travel as they are."""
    encoded = [jpeg_bytes((56, 84), (200, 40, 40)), jpeg_bytes((28, 28), (40, 40, 200))]
    images = [Image.open(io.BytesIO(data)) for data in encoded]
    return CaptionRequest(request_id, "img", images, PS3_LOCAL_PROMPT, encoded)


def captioner(server: FakeChatServer, max_new_tokens: int = 64, **settings) -> OpenAICaptioner:
    defaults = {"base_url": server.url, "backoff_s": 0.0, "max_retries": 2, "timeout_s": 10.0}
    return OpenAICaptioner(
        MODEL, SamplingSettings(max_new_tokens=max_new_tokens), OpenAISettings(**{**defaults, **settings})
    )


def test_success_carries_text_usage_and_finish_reason(fake_openai):
    backend = captioner(fake_openai, max_new_tokens=33)
    backend.setup()
    request = local_request("r1")
    (result,) = backend.generate([request])
    assert fake_openai.problems == []
    assert result.ok and result.request_id == "r1"
    assert result.text == LOCAL_TEXT and result.finish_reason == "stop"
    assert result.prompt_tokens == 207 and result.completion_tokens == len(LOCAL_TEXT.split())
    assert result.latency_ms > 0
    (call,) = fake_openai.calls
    # The prepared JPEGs are sent as they are (no re-encode), global image first, then the prompt.
    assert call.images == request.encoded_images
    assert call.prompt == PS3_LOCAL_PROMPT
    body = call.body
    assert body["max_tokens"] == 33 and body["temperature"] == 0.0 and body["seed"] == 0


def test_images_without_bytes_are_encoded_as_jpeg(fake_openai):
    image = Image.new("RGB", (84, 56), (10, 200, 10))
    (result,) = captioner(fake_openai).generate([CaptionRequest("g", "img", [image], PS3_GLOBAL_PROMPT)])
    assert result.ok and result.text == GLOBAL_TEXT
    assert fake_openai.problems == []
    assert fake_openai.calls[0].sizes == [(84, 56)]


def test_finish_reason_length_and_missing_usage_are_reported(fake_openai):
    def truncated(call: Call) -> Reply:
        body = json.loads(completion("A white square with", "length"))
        del body["usage"]
        return 200, {}, json.dumps(body).encode()

    fake_openai.scenario = truncated
    (result,) = captioner(fake_openai).generate([local_request("r")])
    assert result.ok and result.finish_reason == "length" and result.text == "A white square with"
    assert result.prompt_tokens == 0 and result.completion_tokens == 0


def test_503_then_success_is_retried_honouring_retry_after(fake_openai):
    def flaky(call: Call) -> Reply:
        if call.index == 0:
            return 503, {"Retry-After": "0"}, b'{"error": "warming up"}'
        return answer(call)

    fake_openai.scenario = flaky
    # A long exponential backoff: only honouring Retry-After: 0 keeps this fast.
    backend = captioner(fake_openai, backoff_s=20.0, max_backoff_s=20.0)
    began = time.perf_counter()
    (result,) = backend.generate([local_request("r")])
    assert time.perf_counter() - began < 5.0
    assert result.ok and result.text == LOCAL_TEXT
    assert len(fake_openai.calls) == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_rejected_without_retry(fake_openai, status):
    fake_openai.scenario = lambda call: (status, {}, b'{"error": "image too large"}')
    (result,) = captioner(fake_openai, max_retries=3).generate([local_request("r")])
    assert not result.ok
    assert result.error_reason == "caption_request_rejected" and not result.transient
    assert f"HTTP {status}" in result.error_message and "image too large" in result.error_message
    assert len(fake_openai.calls) == 1


def test_persistent_500_gives_up_as_transient_after_all_retries(fake_openai):
    fake_openai.scenario = lambda call: (500, {}, b'{"error": "engine dead"}')
    (result,) = captioner(fake_openai, max_retries=2).generate([local_request("r")])
    assert result.error_reason == "caption_endpoint_unavailable" and result.transient
    assert "3 attempts" in result.error_message and "HTTP 500" in result.error_message
    assert len(fake_openai.calls) == 3


def test_429_is_retried(fake_openai):
    fake_openai.scenario = lambda call: (429, {}, b"slow down") if call.index < 2 else answer(call)
    (result,) = captioner(fake_openai, max_retries=2).generate([local_request("r")])
    assert result.ok and len(fake_openai.calls) == 3


@pytest.mark.parametrize(
    "body",
    [
        b"this is not json",
        b'{"choices": []}',
        b'{"object": "chat.completion"}',
        b'{"choices": [{"message": null}]}',
    ],
)
def test_malformed_responses_become_bad_response(fake_openai, body):
    fake_openai.scenario = lambda call: (200, {}, body)
    (result,) = captioner(fake_openai).generate([local_request("r")])
    assert result.error_reason == "caption_bad_response" and not result.transient
    assert len(fake_openai.calls) == 1


def test_timeouts_and_refused_connections_are_transient(fake_openai):
    fake_openai.delay_s = 0.5
    (slow,) = captioner(fake_openai, timeout_s=0.1, max_retries=1).generate([local_request("slow")])
    assert slow.error_reason == "caption_endpoint_unavailable" and slow.transient
    assert "Timeout" in slow.error_message
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = OpenAISettings(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.0)
    (refused,) = OpenAICaptioner(MODEL, SamplingSettings(), closed).generate([local_request("refused")])
    assert refused.error_reason == "caption_endpoint_unavailable" and refused.transient


def test_concurrency_is_bounded_and_results_keep_request_order(fake_openai):
    fake_openai.delay_s = 0.1
    requests = [local_request(f"r{i}") for i in range(12)]
    results = captioner(fake_openai, max_concurrency=3).generate(requests)
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert all(r.ok for r in results)
    assert len(fake_openai.calls) == 12
    assert 2 <= fake_openai.max_in_flight <= 3


def test_api_key_is_sent_as_bearer_and_never_logged(fake_openai, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)

    def unhappy(call: Call) -> Reply:
        if call.index % 2 == 0:
            return 503, {"Retry-After": "0"}, b'{"error": "busy"}'
        return 400, {}, b'{"error": "bad image"}'

    fake_openai.scenario = unhappy
    backend = captioner(fake_openai, api_key_env=KEY_ENV, max_concurrency=1)
    backend.setup()
    results = backend.generate([local_request("a"), local_request("b")])
    assert [r.error_reason for r in results] == ["caption_request_rejected"] * 2
    assert {c.authorization for c in fake_openai.calls} == {f"Bearer {SECRET}"}
    assert "retry" in caplog.text  # the retry was logged, just never with the key
    for text in [caplog.text, *(r.error_message for r in results), repr(backend.settings)]:
        assert SECRET not in text


def test_no_authorization_header_without_a_key(fake_openai, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    (result,) = captioner(fake_openai, api_key_env=KEY_ENV).generate([local_request("r")])
    assert result.ok and fake_openai.calls[0].authorization is None


# -- the stage, end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory) -> Path:
    """Two landscape scenes and one portrait scene (its global image is the one the server refuses)."""
    folder = tmp_path_factory.mktemp("small-scenes")
    for seed, size in enumerate([(320, 240), (320, 240), (240, 320)]):
        image, _ = planted_scene(*size, seed, num_patches=2)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (folder / f"scene-{seed}.jpg").write_bytes(buffer.getvalue())
    return folder


def test_caption_stage_through_the_openai_backend(small_scenes, tmp_path, fake_openai, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)

    def refuse_portrait_globals(call: Call) -> Reply:
        (width, height), *crops = call.sizes
        if not crops and height > width:
            return 400, {}, b'{"error": "content policy"}'
        return answer(call)

    fake_openai.scenario = refuse_portrait_globals
    config = load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.shard_size=2",
            "crawl.min_short_side=64",
            "crawl.min_long_side=64",
            "segment.top_k=2",
            "caption.backend=openai",
            f"caption.model={MODEL}",
            "caption.prompts.version=test-v3",
            "caption.sampling.max_new_tokens=40",
            f"caption.openai.base_url={fake_openai.url}",
            f"caption.openai.api_key_env={KEY_ENV}",
            "caption.openai.max_concurrency=2",
            "caption.openai.backoff_s=0",
        ],
        run_root=str(tmp_path / "run"),
        sources=[str(small_scenes)],
    )
    assert run_crawl(config).kept_rows == 3
    assert run_segment(config).failed_shards == []
    result = run_caption(config)
    assert result.failed_shards == [] and result.computed_shards == 2
    assert fake_openai.problems == []

    layout = RunLayout(Storage(config.run_root))
    images = {r["image_id"]: r for s in layout.manifests("crawl") for r in layout.read_output("crawl", s).to_pylist()}
    regions = [r for s in layout.manifests("segment") for r in layout.read_output("segment", s).to_pylist()]
    captions = [r for s in layout.manifests("caption") for r in layout.read_output("caption", s).to_pylist()]
    errors = layout.read_errors("caption").to_pylist()
    assert regions

    # Every region and every image's global request is accounted for exactly once.
    expected = {r["region_id"] for r in regions} | {f"{image_id}:global" for image_id in images}
    produced = [r["region_id"] or f"{r['image_id']}:global" for r in captions] + [e["item_id"] for e in errors]
    assert sorted(produced) == sorted(expected)
    assert len(fake_openai.calls) == len(expected)

    (portrait,) = [i for i, r in images.items() if r["height"] > r["width"]]
    assert [(e["item_id"], e["reason"], e["transient"]) for e in errors] == [
        (f"{portrait}:global", "caption_request_rejected", False)
    ]
    assert "HTTP 400" in errors[0]["message"] and "content policy" in errors[0]["message"]

    for row in captions:
        local = row["region_id"] is not None
        assert row["kind"] == ("local" if local else "global")
        assert row["caption_id"] == caption_id_for(row["image_id"], row["region_id"], "test-v3")
        assert row["raw_text"] == (LOCAL_TEXT if local else GLOBAL_TEXT)
        # The paper's boilerplate prefix is stripped from the clean text only.
        expected_clean = "A white square with tiny dark letters on it." if local else GLOBAL_TEXT
        assert row["clean_text"] == expected_clean
        assert row["model"] == MODEL and row["prompt_version"] == "test-v3"
        assert json.loads(row["sampling_json"])["max_new_tokens"] == 40
        assert row["prompt_tokens"] == (207 if local else 107)
        assert row["latency_ms"] > 0

    # Local requests carry [global image, crop, local prompt]; the global image is the one sent alone.
    local_calls = [c for c in fake_openai.calls if len(c.images) == 2]
    global_calls = [c for c in fake_openai.calls if len(c.images) == 1]
    assert {c.prompt for c in local_calls} == {PS3_LOCAL_PROMPT}
    assert {c.prompt for c in global_calls} == {PS3_GLOBAL_PROMPT}
    global_digests = {hashlib.sha256(c.images[0]).hexdigest() for c in global_calls}
    assert {hashlib.sha256(c.images[0]).hexdigest() for c in local_calls} <= global_digests
    assert {c.authorization for c in fake_openai.calls} == {f"Bearer {SECRET}"}
    # The key is read from the environment only: neither the config snapshot nor any error holds it.
    assert SECRET not in layout.storage.read_bytes(layout.RUN_CONFIG_KEY).decode()
    assert all(SECRET not in e["message"] for e in errors)

"""vLLM for real on CPU: the offline engine in the caption stage's Ray actors, and ``vllm serve`` behind
the OpenAI backend, both with the tiny Qwen2-VL captioner.

vLLM pins its own torch, so it lives in ``.venv-vllm`` (``scripts/setup_vllm.sh``), never in ``.venv``.
From the main environment, :func:`test_vllm_suite_in_its_own_environment` creates that environment if
needed (skipping with the reason only when it cannot) and runs this same file inside it, where
``vllm`` imports and the real tests below run. The tiny captioner is built once by the main session
and handed over through ``PS3_TINY_CAPTIONER``.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ps3_engine.stages.captioning.backends import CaptionBackendUnavailable, CaptionRequest, SamplingSettings
from ps3_engine.stages.captioning.vllm_backend import (
    VllmCaptioner,
    VllmSettings,
    _check_platform,
    server_command,
    server_environment,
)

IN_VLLM_ENV = importlib.util.find_spec("vllm") is not None
REPO = Path(__file__).resolve().parents[3]
# scripts/setup_vllm.sh's location rule: $PS3_VLLM_VENV, else .venv-vllm in the checkout.
VLLM_PYTHON = (REPO / os.environ.get("PS3_VLLM_VENV", ".venv-vllm")).expanduser() / "bin" / "python"


# -- what runs everywhere (no engine) -------------------------------------------------------------


def test_server_command_mirrors_the_offline_engine_settings():
    settings = VllmSettings(device="cpu", dtype="float32", max_model_len=2048, enforce_eager=True)
    command = server_command("/m/tiny", "127.0.0.1", 8011, settings, 7056, 784)
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    assert flags["--model"] == "/m/tiny" and flags["--served-model-name"] == "/m/tiny"
    assert flags["--port"] == "8011" and flags["--max-model-len"] == "2048" and flags["--dtype"] == "float32"
    assert command[command.index("--limit-mm-per-prompt") + 1] == '{"image":2,"video":0}'
    assert command[command.index("--mm-processor-kwargs") + 1] == '{"max_pixels":7056,"min_pixels":784}'
    assert "--enable-prefix-caching" in command and "--enforce-eager" in command
    assert "--gpu-memory-utilization" not in command  # the CPU build sizes its KV cache from the environment
    assert server_environment(settings) == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    gpu = server_command("/m/tiny", "127.0.0.1", 8011, VllmSettings(), 7056, 784)
    assert "--gpu-memory-utilization" in gpu and server_environment(VllmSettings()) == {}


def test_a_device_that_does_not_match_the_vllm_build_is_refused():
    with pytest.raises(CaptionBackendUnavailable, match=r"caption\.vllm\.device=cpu"):
        _check_platform("cuda", is_cpu_build=True)
    with pytest.raises(CaptionBackendUnavailable, match="setup_vllm"):
        _check_platform("cpu", is_cpu_build=False)
    _check_platform("cpu", is_cpu_build=True)
    _check_platform("cuda", is_cpu_build=False)


# -- from the main environment: run the real tests in .venv-vllm -------------------------------------


def _ensure_vllm_env() -> None:
    """Create .venv-vllm with the project's script; skip (with its last words) only when that fails."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_vllm.sh")], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the vLLM CPU environment (.venv-vllm) could not be created: {reason}")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # creating the environment on a fresh machine is most of it (docs/benchmarks.md)
@pytest.mark.skipif(IN_VLLM_ENV, reason="vllm imports here: the tests below run directly")
def test_vllm_suite_in_its_own_environment(tiny_captioner):
    _ensure_vllm_env()
    env = {**os.environ, "PS3_TINY_CAPTIONER": str(tiny_captioner), "RAY_AUTH_MODE": "disabled"}
    command = [str(VLLM_PYTHON), "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", __file__]
    command += ["-k", "not test_vllm_suite_in_its_own_environment"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    # Every real test ran: none skipped, the wrapper itself is deselected there.
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, tail


# -- inside .venv-vllm: the real engine --------------------------------------------------------------

needs_vllm = pytest.mark.skipif(not IN_VLLM_ENV, reason="runs inside .venv-vllm (see the test above)")
SETTINGS = VllmSettings(device="cpu", dtype="float32", max_model_len=1024, cpu_kv_cache_gib=1, enforce_eager=True)
MAX_PIXELS, MIN_PIXELS = 9 * 28 * 28, 28 * 28


@pytest.fixture(scope="module")
def captioner_dir(request) -> Path:
    handed = os.environ.get("PS3_TINY_CAPTIONER")
    return Path(handed) if handed else request.getfixturevalue("tiny_captioner")


def jpeg_image(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((240, 240, 240), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def engine(captioner_dir):
    """One in-process engine for the request-level tests (starting one takes 20-50 s on two cores)."""
    backend = VllmCaptioner(str(captioner_dir), SamplingSettings(max_new_tokens=16), SETTINGS, MAX_PIXELS, MIN_PIXELS)
    backend.setup()
    yield backend
    backend.close()


def image_tokens(size: tuple[int, int], max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS) -> int:
    """Qwen2-VL's token count for an image: its processor's resize, 14-px patches merged 2x2."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(size[1], size[0], factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return (height // 28) * (width // 28)


def expected_prompt_tokens(processor, prompt: str, sizes: list[tuple[int, int]], **budget: int) -> int:
    """Chat-templated text tokens, with each image's single placeholder expanded to its token count."""
    from ps3_engine.stages.captioning.backends import chat_messages

    request = CaptionRequest("x", "g", [Image.new("RGB", s) for s in sizes], prompt)
    text = processor.apply_chat_template(chat_messages(request), add_generation_prompt=True, tokenize=False)
    num_text = len(processor.tokenizer(text)["input_ids"]) - len(sizes)
    return num_text + sum(image_tokens(s, **budget) for s in sizes)


def image_pad_runs(token_ids: list[int], pad_id: int) -> list[int]:
    """Lengths of the runs of ``pad_id`` in order: one run per image in the prompt."""
    runs, current = [], 0
    for token in [*token_ids, -1]:
        if token == pad_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.slow
@needs_vllm
def test_two_images_in_the_papers_order_at_the_pixel_budget(engine):
    from ps3_engine.stages.captioning.prompts import PS3_LOCAL_PROMPT

    # Sent unresized: the engine's processor must apply caption.max_pixels (7056), not the model's default
    # (12544, which would give 16 tokens for the 640x480 image instead of 9).
    scene, crop = jpeg_image((640, 480), (200, 40, 40)), jpeg_image((200, 100), (40, 40, 200))
    request = CaptionRequest("local", "img", [scene, crop], PS3_LOCAL_PROMPT)
    # The engine's own view of the prompt (its private LLM): which image tokens come first.
    (output,) = engine._llm.generate([engine.engine_prompt(request)], engine._sampling_params, use_tqdm=False)
    pad_id = engine._processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad_runs(list(output.prompt_token_ids), pad_id) == [image_tokens((640, 480)), image_tokens((200, 100))]
    assert image_tokens((640, 480)) != image_tokens((640, 480), max_pixels=112 * 112)

    (result,) = engine.generate([request])
    assert result.ok and result.prompt_tokens == len(output.prompt_token_ids)
    assert result.prompt_tokens == expected_prompt_tokens(engine._processor, PS3_LOCAL_PROMPT, [(640, 480), (200, 100)])


@pytest.mark.slow
@needs_vllm
def test_requests_the_engine_rejects_become_error_results_and_it_keeps_serving(engine, caplog):
    from ps3_engine.stages.captioning.prompts import PS3_GLOBAL_PROMPT, PS3_LOCAL_PROMPT

    scene = jpeg_image((640, 480), (30, 160, 60))
    good_global = CaptionRequest("global", "img", [scene], PS3_GLOBAL_PROMPT)
    good_local = CaptionRequest("local", "img", [scene, scene.crop((0, 0, 320, 240))], PS3_LOCAL_PROMPT)
    too_long = CaptionRequest("too-long", "img", [scene], " ".join([PS3_GLOBAL_PROMPT] * 30))
    # Qwen2-VL's processor refuses aspect ratios over 200.
    sliver = CaptionRequest("sliver", "img", [Image.new("RGB", (2000, 4), (200, 40, 40))], PS3_GLOBAL_PROMPT)
    before = engine.prefix_cache_counters()
    results = engine.generate([good_global, too_long, good_local, sliver])

    assert [r.request_id for r in results] == ["global", "too-long", "local", "sliver"]
    rejected = {r.request_id: r for r in results if not r.ok}
    assert set(rejected) == {"too-long", "sliver"}
    assert {r.error_reason for r in rejected.values()} == {"caption_request_failed"}
    assert "maximum context length" in rejected["too-long"].error_message
    assert "aspect ratio" in rejected["sliver"].error_message
    answered = [r for r in results if r.ok]
    for result in answered:
        assert result.text and 0 < result.completion_tokens <= 16 and result.finish_reason in {"stop", "length"}
    assert "splitting" in caplog.text

    # The same engine keeps serving, deterministically (greedy), and reuses the cached prefix of a repeat.
    again = engine.generate([good_local, good_global])
    assert [(r.request_id, r.text) for r in again] == [(r.request_id, r.text) for r in (answered[1], answered[0])]
    after = engine.prefix_cache_counters()
    assert after.queries > before.queries and after.hits > before.hits
    assert sum(r.cached_tokens for r in again) > 0


# -- the stage: crawled and segmented 4K images, run root on a loopback S3 server ---------------------


@pytest.fixture(scope="module")
def scenes_4k(tmp_path_factory) -> Path:
    from ps3_engine.pipeline.samples import planted_scene

    folder = tmp_path_factory.mktemp("scenes-4k")
    for seed in range(3):
        image, _ = planted_scene(3840, 2160, seed, num_patches=2)
        image.save(folder / f"scene-{seed}.jpg", "JPEG", quality=90)
    return folder


def run_config(run_root: str, scenes: Path, captioner: Path, *overrides: str):
    from ps3_engine.pipeline.config import load_run_config

    return load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.shard_size=2",
            "segment.top_k=2",
            f"caption.model={captioner}",
            f"caption.max_pixels={MAX_PIXELS}",
            f"caption.min_pixels={MIN_PIXELS}",
            "caption.sampling.max_new_tokens=24",
            "caption.max_workers=1",
            *overrides,
        ],
        run_root=run_root,
        sources=[str(scenes)],
    )


VLLM_OVERRIDES = (
    "caption.backend=vllm",
    "caption.vllm.device=cpu",
    "caption.vllm.dtype=float32",
    "caption.vllm.max_model_len=1024",
    "caption.vllm.cpu_kv_cache_gib=1",
    "caption.vllm.enforce_eager=true",
)


def stage_rows(config, stage: str) -> list[dict]:
    from ps3_engine.infra.storage import Storage
    from ps3_engine.pipeline.layout import RunLayout

    layout = RunLayout(Storage(config.run_root))
    return [row for shard in sorted(layout.manifests(stage)) for row in layout.read_output(stage, shard).to_pylist()]


def caption_errors(config) -> list[dict]:
    from ps3_engine.infra.storage import Storage
    from ps3_engine.pipeline.layout import RunLayout

    return RunLayout(Storage(config.run_root)).read_errors("caption").to_pylist()


def check_every_subject_once(config) -> tuple[list[dict], list[dict]]:
    """Every region and every image's global request left as one caption row or one error row."""
    images = stage_rows(config, "crawl")
    regions = stage_rows(config, "segment")
    captions, errors = stage_rows(config, "caption"), caption_errors(config)
    assert len(images) == 3 and regions
    expected = {r["region_id"] for r in regions} | {f"{i['image_id']}:global" for i in images}
    produced = [r["region_id"] or f"{r['image_id']}:global" for r in captions] + [e["item_id"] for e in errors]
    assert sorted(produced) == sorted(expected)
    return captions, errors


def check_prompt_tokens(config, captions: list[dict], processor) -> None:
    """Each row's prompt tokens: the paper's prompt with its images at the stage's pixel budget, in order."""
    from ps3_engine.stages.geometry import fit_to_pixel_budget

    images = {r["image_id"]: (r["width"], r["height"]) for r in stage_rows(config, "crawl")}
    boxes = {r["region_id"]: (r["x1"] - r["x0"], r["y1"] - r["y0"]) for r in stage_rows(config, "segment")}
    prompts = config.caption.prompts
    for row in captions:
        sent = [fit_to_pixel_budget(*images[row["image_id"]], MAX_PIXELS, MIN_PIXELS, 28)]
        if row["region_id"] is not None:
            sent.append(fit_to_pixel_budget(*boxes[row["region_id"]], MAX_PIXELS, MIN_PIXELS, 28))
        prompt = prompts.local if row["region_id"] is not None else prompts.global_
        assert row["prompt_tokens"] == expected_prompt_tokens(processor, prompt, sent), row["caption_id"]


@pytest.mark.slow
@needs_vllm
def test_caption_stage_with_vllm_in_ray_actors_matches_the_transformers_rows(
    scenes_4k, s3_bucket, captioner_dir, ray_local
):
    from transformers import AutoProcessor

    from ps3_engine.pipeline.runner import run_caption, run_crawl, run_segment
    from ps3_engine.schemas import CAPTION_SCHEMA

    base = run_config(f"s3://{s3_bucket}/run", scenes_4k, captioner_dir, *VLLM_OVERRIDES)
    assert run_crawl(base).kept_rows == 3
    assert run_segment(base).failed_shards == []
    on_ray = base.model_copy(update={"executor": base.executor.model_copy(update={"kind": "ray"})})
    result = run_caption(on_ray)
    assert result.failed_shards == [] and result.computed_shards == 2
    captions, errors = check_every_subject_once(base)
    assert result.output_rows == len(captions) and result.error_rows == len(errors)
    # The tiny captioner answers every request; only caption hygiene may filter an answer.
    assert {e["category"] for e in errors} <= {"filtered"}
    assert {r["kind"] for r in captions} == {"local", "global"}
    for row in captions:
        assert row["model"] == str(captioner_dir) and row["clean_text"] and 0 < row["completion_tokens"] <= 24
    check_prompt_tokens(base, captions, AutoProcessor.from_pretrained(captioner_dir))

    # The transformers backend on the same regions: the same rows, field for field in kind and shape.
    hf = run_config(base.run_root, scenes_4k, captioner_dir, "caption.transformers.device=cpu")
    assert run_caption(hf, force=True).failed_shards == []
    hf_captions, _ = check_every_subject_once(hf)
    by_id = {r["caption_id"]: r for r in hf_captions}
    # Hygiene may filter a different answer or two of each backend; the rest pair up by caption id.
    shared = [r for r in captions if r["caption_id"] in by_id]
    assert len(shared) >= len(captions) - 2 and shared
    for row in shared:
        twin = by_id[row["caption_id"]]
        assert set(row) == set(twin) == set(CAPTION_SCHEMA.names)
        for name in ("image_id", "region_id", "shard_id", "kind", "prompt_version", "sampling_json", "prompt_tokens"):
            assert row[name] == twin[name], name
        assert all(type(row[n]) is type(twin[n]) for n in row if row[n] is not None and twin[n] is not None)


# -- `vllm serve` on loopback behind the OpenAI backend -------------------------------------------------

SECRET = "sk-vllm-test-5f1c2e-never-log-me"
KEY_ENV = "PS3_TEST_VLLM_API_KEY"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(captioner_dir, tmp_path_factory):
    """The OpenAI-compatible vLLM server on loopback with the tiny captioner; it requires ``SECRET``."""
    import signal
    import time

    import urllib3

    port = free_port()
    command = server_command(str(captioner_dir), "127.0.0.1", port, SETTINGS, MAX_PIXELS, MIN_PIXELS)
    env = {**os.environ, **server_environment(SETTINGS), "VLLM_API_KEY": SECRET}
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    http = urllib3.PoolManager(retries=False)
    deadline = time.monotonic() + 420
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm server exited ({process.returncode}): {log_path.read_text()[-3000:]}")
            try:
                if http.request("GET", f"{url}/health", timeout=2).status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        yield url, log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class FaultProxy:
    """A loopback proxy in front of the real server: counts concurrency, fails some first attempts.

    The first attempt of every third distinct request gets a 503 with ``Retry-After: 0``; the first attempt
    of the second distinct request stalls past the client's timeout. Every other attempt goes through.
    """

    def __init__(self, upstream: str, stall_s: float) -> None:
        import threading

        import urllib3

        self.upstream, self.stall_s = upstream, stall_s
        self.http = urllib3.PoolManager(maxsize=16, retries=False)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.seen: dict[str, int] = {}
        self.injected_503 = self.stalled = self.forwarded = 0
        self.authorizations: set[str | None] = set()

    def fault_for(self, body: bytes) -> str | None:
        import hashlib

        digest = hashlib.sha256(body).hexdigest()
        with self.lock:
            first = digest not in self.seen
            self.seen.setdefault(digest, len(self.seen))
            index = self.seen[digest]
        if first and index == 1:
            return "stall"
        if first and index % 3 == 2:
            return "503"
        return None

    def handle(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        import time

        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.authorizations.add(headers.get("Authorization"))
        try:
            fault = self.fault_for(body)
            if fault == "stall":
                self.stalled += 1
                time.sleep(self.stall_s)
                return 504, {}, b"{}"
            if fault == "503":
                self.injected_503 += 1
                return 503, {"Retry-After": "0"}, b'{"error": "overloaded"}'
            forward = {k: v for k, v in headers.items() if k in ("Authorization", "Content-Type")}
            response = self.http.request("POST", self.upstream + path, body=body, headers=forward, timeout=120)
            with self.lock:
                self.forwarded += 1
            return response.status, {}, response.data
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def fault_proxy(vllm_server):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    proxy = FaultProxy(vllm_server[0], stall_s=13.0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, headers, data = proxy.handle(self.path, body, dict(self.headers.items()))
            try:
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up on a stalled attempt

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    proxy.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield proxy
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
@needs_vllm
def test_openai_backend_against_a_real_vllm_server(
    scenes_4k, s3_bucket, s3_server, captioner_dir, vllm_server, fault_proxy, monkeypatch, caplog
):
    import logging

    import urllib3
    from transformers import AutoProcessor

    from ps3_engine.pipeline.runner import run_caption, run_crawl, run_segment

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    config = run_config(
        f"s3://{s3_bucket}/run",
        scenes_4k,
        captioner_dir,
        "caption.backend=openai",
        f"caption.openai.base_url={fault_proxy.url}",
        f"caption.openai.api_key_env={KEY_ENV}",
        "caption.openai.max_concurrency=4",
        "caption.openai.timeout_s=12",
        "caption.openai.backoff_s=0.05",
        "caption.openai.max_retries=3",
    )
    assert run_crawl(config).kept_rows == 3
    assert run_segment(config).failed_shards == []
    result = run_caption(config)
    assert result.failed_shards == [] and result.computed_shards == 2
    captions, errors = check_every_subject_once(config)
    assert {e["category"] for e in errors} <= {"filtered"}
    subjects = len(captions) + len(errors)

    # Real answers from the real server, through concurrency, a 503 and a timeout, each retried.
    assert fault_proxy.forwarded == subjects and fault_proxy.stalled == 1 and fault_proxy.injected_503 >= 1
    assert len(fault_proxy.seen) == subjects and fault_proxy.max_in_flight >= 2
    assert "retry" in caplog.text
    for row in captions:
        assert row["model"] == str(captioner_dir) and row["clean_text"] and 0 < row["completion_tokens"] <= 24
    # The server saw the same prompts as the offline engine: the paper's order at the pixel budget.
    check_prompt_tokens(config, captions, AutoProcessor.from_pretrained(captioner_dir))

    # The key was required by the server, sent by the client, and written or logged nowhere.
    assert fault_proxy.authorizations == {f"Bearer {SECRET}"}
    unauthenticated = urllib3.request("POST", f"{vllm_server[0]}/v1/chat/completions", json={"model": "x"})
    assert unauthenticated.status == 401
    client = s3_server.client()
    objects = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert objects
    for entry in objects:
        assert SECRET.encode() not in client.get_object(Bucket=s3_bucket, Key=entry["Key"])["Body"].read()
    assert SECRET not in caplog.text and SECRET not in vllm_server[1].read_text()

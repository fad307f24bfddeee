"""Captioner behind any OpenAI-compatible chat endpoint (``vllm serve``, a hosted API, ...).

Requests run concurrently up to ``max_concurrency``; 429/5xx/timeouts are retried with exponential
backoff (Retry-After honoured); other 4xx answers end that request as an error row. The API key comes
from the environment variable named in the settings and is never logged or written anywhere.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.infra.http import parse_retry_after
from ps3_engine.stages.captioning.backends import (
    CaptionBackend,
    CaptionBackendUnavailable,
    CaptionRequest,
    CaptionResult,
    SamplingSettings,
)

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAISettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field("http://127.0.0.1:8000/v1", description="endpoint root, ending before /chat/completions")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key (may be unset)")
    max_concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(60.0, ge=0)


class OpenAICaptioner(CaptionBackend):
    def __init__(self, model: str, sampling: SamplingSettings, settings: OpenAISettings) -> None:
        super().__init__(model, sampling)
        self.settings = settings
        self._pool: urllib3.PoolManager | None = None
        self._headers: dict[str, str] = {}

    def setup(self) -> None:
        if not self.settings.base_url.startswith(("http://", "https://")):
            raise CaptionBackendUnavailable(f"openai.base_url {self.settings.base_url!r} is not an http(s) URL")
        self._pool = urllib3.PoolManager(maxsize=self.settings.max_concurrency, retries=False)
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.settings.api_key_env)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
        self._pool = None

    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        if self._pool is None:
            self.setup()
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            return list(pool.map(self._caption_one, requests))

    # -- one request ---------------------------------------------------------------------------
    def _payload(self, request: CaptionRequest) -> bytes:
        encoded = request.encoded_images or [_jpeg(image) for image in request.images]
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}
            for data in encoded
        ]
        content.append({"type": "text", "text": request.prompt})
        sampling = self.sampling
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
            "repetition_penalty": sampling.repetition_penalty,
        }
        return json.dumps(body).encode()

    def _caption_one(self, request: CaptionRequest) -> CaptionResult:
        assert self._pool is not None
        url = self.settings.base_url.rstrip("/") + "/chat/completions"
        body = self._payload(request)
        began = time.perf_counter()
        last_problem = ""
        for attempt in range(self.settings.max_retries + 1):
            wait_s = min(self.settings.max_backoff_s, self.settings.backoff_s * 2**attempt)
            try:
                response = self._pool.request(
                    "POST",
                    url,
                    body=body,
                    headers=self._headers,
                    timeout=urllib3.Timeout(total=self.settings.timeout_s),
                    redirect=False,
                )
            except urllib3.exceptions.HTTPError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status == 200:
                    return _parse_completion(request.request_id, response.data, began)
                last_problem = f"HTTP {response.status}: {response.data[:300].decode(errors='replace')}"
                if response.status not in RETRY_STATUSES:
                    return CaptionResult(
                        request_id=request.request_id,
                        error_reason="caption_request_rejected",
                        error_message=last_problem,
                        latency_ms=(time.perf_counter() - began) * 1000.0,
                    )
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None:
                    wait_s = min(self.settings.max_backoff_s, retry_after)
            if attempt < self.settings.max_retries:
                logger.debug("caption request %s: %s; retry in %.1fs", request.request_id, last_problem, wait_s)
                time.sleep(wait_s)
        return CaptionResult(
            request_id=request.request_id,
            error_reason="caption_endpoint_unavailable",
            error_message=f"gave up after {self.settings.max_retries + 1} attempts: {last_problem}",
            transient=True,
            latency_ms=(time.perf_counter() - began) * 1000.0,
        )


def _parse_completion(request_id: str, data: bytes, began: float) -> CaptionResult:
    latency_ms = (time.perf_counter() - began) * 1000.0
    try:
        payload = json.loads(data)
        choice = payload["choices"][0]
        text = choice["message"]["content"] or ""
        usage = payload.get("usage") or {}
        # vLLM reports prefix-cache hits here when started with --enable-prompt-tokens-details.
        cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return CaptionResult(
            request_id=request_id,
            error_reason="caption_bad_response",
            error_message=f"unparseable completion: {exc}: {data[:300]!r}",
            latency_ms=latency_ms,
        )
    return CaptionResult(
        request_id=request_id,
        text=text.strip(),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        latency_ms=latency_ms,
        cached_tokens=cached_tokens,
    )


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()

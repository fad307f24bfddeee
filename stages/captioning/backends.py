"""One interface for every captioner: a list of two-image (or one-image) requests in, one result each out.

Backends never raise for a single bad request: its result carries ``error_reason`` instead, so one
broken image or over-long prompt becomes an error row and the worker (and its loaded model) lives on.
They raise only when they cannot work at all (missing package, missing weights, server unreachable
after every retry), which fails the shard and leaves it for the rerun.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class CaptionBackendUnavailable(RuntimeError):
    """The backend cannot run here (package not installed, weights not found, endpoint unusable)."""


class SamplingSettings(BaseModel):
    """Decoding parameters; recorded as JSON in every caption row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(192, ge=1)
    repetition_penalty: float = Field(1.05, gt=0)
    seed: int = 0


@dataclass
class CaptionRequest:
    """``images``: the global image first, then the crop (local) or the image alone (global)."""

    request_id: str
    group: str  # image id: requests of one image go out together so the shared prefix is cached
    images: list[Image.Image]
    prompt: str
    # The same images as JPEG bytes, for backends that send bytes (no re-encode); may be empty.
    encoded_images: list[bytes] = field(default_factory=list)


@dataclass
class CaptionResult:
    request_id: str
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    # Prompt tokens served from the engine's prefix cache (vLLM; 0 where a backend cannot tell).
    cached_tokens: int = 0
    error_reason: str | None = None
    error_message: str = ""
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.error_reason is None


class CaptionBackend(ABC):
    """A loaded captioner. ``setup`` loads weights or opens clients once per worker."""

    def __init__(self, model: str, sampling: SamplingSettings) -> None:
        self.model = model
        self.sampling = sampling

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass

    @abstractmethod
    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]: ...


def chat_messages(request: CaptionRequest) -> list[dict]:
    """The request as one user turn: images first (global, then crop), then the instruction."""
    content: list[dict] = [{"type": "image"} for _ in request.images]
    content.append({"type": "text", "text": request.prompt})
    return [{"role": "user", "content": content}]


def generate_isolating_failures(
    requests: Sequence[CaptionRequest],
    run_batch: Callable[[Sequence[CaptionRequest]], list[CaptionResult]],
    is_out_of_memory: Callable[[BaseException], bool],
) -> list[CaptionResult]:
    """Run ``run_batch``; when it raises, bisect so the failing requests alone get error results.

    Out-of-memory is split the same way; a single request that still fails is reported, not raised.
    """
    if not requests:
        return []
    try:
        return run_batch(requests)
    except Exception as exc:
        if len(requests) == 1:
            reason = "out_of_memory" if is_out_of_memory(exc) else "caption_request_failed"
            logger.warning("caption request %s failed: %s", requests[0].request_id, exc)
            return [
                CaptionResult(
                    request_id=requests[0].request_id,
                    error_reason=reason,
                    error_message=describe_failure(exc)[:2000],
                )
            ]
        middle = len(requests) // 2
        logger.warning("caption batch of %d failed (%s); splitting", len(requests), type(exc).__name__)
        return [
            *generate_isolating_failures(requests[:middle], run_batch, is_out_of_memory),
            *generate_isolating_failures(requests[middle:], run_batch, is_out_of_memory),
        ]


def describe_failure(exc: BaseException) -> str:
    """``Type: message``, followed by its direct cause: engines wrap the processor's reason (vLLM's
    "Failed to apply Qwen2VLProcessor" hides "aspect ratio must be smaller than 200" in ``__cause__``)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def torch_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0

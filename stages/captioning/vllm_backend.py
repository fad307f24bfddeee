"""vLLM offline engine captioner: the production path (GPU, tensor parallel, prefix caching).

``vllm`` is imported only in :meth:`VllmCaptioner.setup`, so the rest of the engine installs and runs
without the ``[gpu]`` extra. Requests arrive grouped by image (global request first, then the crops of
the same image), so the shared global-image tokens and prompt prefix stay hot in vLLM's prefix cache.
A batch that raises is bisected: the bad request becomes an error result and the engine stays up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
    "on a CPU machine use caption.backend=transformers"
)


class VllmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (one Ray actor holds them all)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(8192, ge=256)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int = Field(128, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_batch_requests: int = Field(512, ge=1, description="requests handed to one llm.generate call")
    weights_cache_dir: str = "~/.cache/ps3-engine/captioners"


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
        except ImportError as exc:
            raise CaptionBackendUnavailable(GPU_EXTRA_MESSAGE) from exc
        from transformers import AutoProcessor

        path = resolve_model_dir(self.model, self.settings.weights_cache_dir, self.s3)
        self._processor = AutoProcessor.from_pretrained(path)
        s = self.settings
        self._llm = vllm.LLM(
            model=path,
            tensor_parallel_size=s.tensor_parallel_size,
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=s.max_num_seqs,
            enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=s.enforce_eager,
            limit_mm_per_prompt={"image": 2},
            # Qwen2-VL's processor resizes to this budget; the stage already resized, this keeps them equal.
            mm_processor_kwargs={"max_pixels": self.max_pixels, "min_pixels": self.min_pixels},
        )
        sampling = self.sampling
        self._sampling_params = vllm.SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed,
        )
        logger.info("vLLM captioner %s, tensor parallel %d", self.model, s.tensor_parallel_size)

    def close(self) -> None:
        self._llm = None

    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        results: list[CaptionResult] = []
        size = self.settings.max_batch_requests
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            results.extend(generate_isolating_failures(chunk, self._generate_chunk, torch_out_of_memory))
        return results

    def _generate_chunk(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        prompts = [
            {
                "prompt": self._processor.apply_chat_template(
                    chat_messages(r), add_generation_prompt=True, tokenize=False
                ),
                "multi_modal_data": {"image": r.images},
            }
            for r in requests
        ]
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
                )
            )
        return results

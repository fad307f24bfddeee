"""Hugging Face ``generate`` captioner (CPU or GPU): the CPU test path and a small-scale GPU path."""

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


class TransformersSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_requests: int = Field(8, ge=1, description="requests per generate call")
    weights_cache_dir: str = "~/.cache/ps3-engine/captioners"


class TransformersCaptioner(CaptionBackend):
    def __init__(
        self, model: str, sampling: SamplingSettings, settings: TransformersSettings, s3: S3Settings | None = None
    ) -> None:
        super().__init__(model, sampling)
        self.settings = settings
        self.s3 = s3
        self._model: Any = None
        self._processor: Any = None
        self._device = "cpu"

    def setup(self) -> None:
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor
        except ImportError as exc:
            raise CaptionBackendUnavailable(
                "the transformers backend needs torch and transformers: pip install 'ps3-engine[models]'"
            ) from exc
        path = resolve_model_dir(self.model, self.settings.weights_cache_dir, self.s3)
        wants_cuda = self.settings.device == "cuda" or (self.settings.device == "auto" and torch.cuda.is_available())
        if self.settings.device == "cuda" and not torch.cuda.is_available():
            raise CaptionBackendUnavailable("transformers.device is 'cuda' but torch sees no CUDA device")
        self._device = "cuda" if wants_cuda else "cpu"
        dtype: Any = "auto" if self.settings.dtype == "auto" else getattr(torch, self.settings.dtype)
        try:
            self._processor = AutoProcessor.from_pretrained(path)
            self._model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(self._device).eval()
        except OSError as exc:
            raise CaptionBackendUnavailable(f"cannot load captioner {self.model!r}: {exc}") from exc
        # Decoder-only batching needs left padding so every prompt ends where generation starts.
        self._processor.tokenizer.padding_side = "left"
        logger.info("transformers captioner %s on %s", self.model, self._device)

    def close(self) -> None:
        self._model = None
        self._processor = None

    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        results: list[CaptionResult] = []
        size = self.settings.max_batch_requests
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            results.extend(generate_isolating_failures(chunk, self._generate_chunk, torch_out_of_memory))
        return results

    def _generate_chunk(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        import torch

        processor, model = self._processor, self._model
        texts = [
            processor.apply_chat_template(chat_messages(r), add_generation_prompt=True, tokenize=False)
            for r in requests
        ]
        began = time.perf_counter()
        inputs = processor(text=texts, images=[r.images for r in requests], padding=True, return_tensors="pt")
        inputs = inputs.to(self._device)
        tokenizer = processor.tokenizer
        eos_ids = _eos_ids(model, tokenizer)
        sampling = self.sampling
        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                top_k=None,
                repetition_penalty=sampling.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=list(eos_ids),
            )
        latency_ms = (time.perf_counter() - began) * 1000.0 / len(requests)
        prompt_len = inputs["input_ids"].shape[1]
        results = []
        for i, request in enumerate(requests):
            new_tokens = output[i, prompt_len:].tolist()
            stop_at = next((j for j, t in enumerate(new_tokens) if t in eos_ids), None)
            generated = new_tokens if stop_at is None else new_tokens[: stop_at + 1]
            results.append(
                CaptionResult(
                    request_id=request.request_id,
                    text=tokenizer.decode(generated, skip_special_tokens=True).strip(),
                    finish_reason="length" if stop_at is None else "stop",
                    prompt_tokens=int(inputs["attention_mask"][i].sum()),
                    completion_tokens=len(generated),
                    latency_ms=latency_ms,
                )
            )
        return results


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found

"""Fixed-cost fake models for pipeline benchmarks, importable by Ray workers (``benchmarks.fakes``).

``FakeSegmentStage`` and ``FakeCaptionStage`` are the real stages with only the model swapped: the
segmenter sleeps ``fake_model_ms`` per image and returns a fixed mask set (four small segments on a
flat background, so the PS3 box rule picks four boxes), and the captioner sleeps ``fake_model_ms`` per
request (``benchmarks.caption.FixedCostCaptioner``). Everything around the model (decode of the working
copy, box selection, the caption CPU phase, caption cleaning, rows, shard I/O, the executor) is the
project's code.

Both fakes append one JSON line per call to ``<fake_stats_dir>/<pid>.jsonl`` with wall-clock start and
end (``time.time()``, comparable across processes): kind ``model`` for the time inside the fake model,
``batch`` for a whole ``process_batch`` call and ``prepare`` for the caption CPU phase. The benchmark
reads them back to measure how busy the model actors were.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from benchmarks.caption import FixedCostCaptioner
from ps3_engine.stages.base import BatchResult, Resources, ShardContext
from ps3_engine.stages.caption import CaptionConfig, CaptionStage
from ps3_engine.stages.captioning.backends import CaptionBackend, CaptionRequest, CaptionResult
from ps3_engine.stages.segment import SegmentConfig, SegmentStage
from ps3_engine.stages.segmenters.masks import MaskSet


def record(stats_dir: str, kind: str, stage: str, start: float, end: float, items: int) -> None:
    """Append one interval to this process's log (one small write per call: cheap next to any model)."""
    line = json.dumps({"kind": kind, "stage": stage, "pid": os.getpid(), "start": start, "end": end, "items": items})
    with (Path(stats_dir) / f"{os.getpid()}.jsonl").open("a") as sink:
        sink.write(line + "\n")


def read_records(stats_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(stats_dir.glob("*.jsonl")) for line in path.read_text().splitlines()]


class FakeModelFields(BaseModel):
    fake_model_ms: float = Field(..., ge=0, description="sleep per image (segment) or per request (caption)")
    fake_stats_dir: str = Field(..., description="folder the per-process interval logs go to")
    # A GPU model actor's Ray remote args differ from the CPU phase's (num_gpus); CPU-only fakes have the
    # same args, and Ray Data then fuses the CPU phase into the model actors. Declaring memory on the
    # model actors makes their args differ the way a GPU request does.
    actor_memory_mb: int | None = Field(None, ge=1, description="Ray memory request per model actor")

    def fake_resources(self, max_workers: int | None, batch_size: int) -> Resources:
        memory = self.actor_memory_mb * 2**20 if self.actor_memory_mb else None
        return Resources(
            num_cpus=1.0, memory_bytes=memory, uses_model=True, max_workers=max_workers, batch_size=batch_size
        )


class FakeSegmentConfig(SegmentConfig, FakeModelFields):
    pass


class FakeCaptionConfig(CaptionConfig, FakeModelFields):
    pass


@cache
def _fixed_labels(work_height: int, work_width: int) -> np.ndarray:
    """A flat background (segment 0) with four small square segments spread over the image."""
    labels = np.zeros((work_height, work_width), np.int32)
    side = max(2, min(work_height, work_width) // 40)
    for index, (fx, fy) in enumerate([(0.15, 0.2), (0.6, 0.25), (0.3, 0.7), (0.8, 0.75)], start=1):
        x, y = int(fx * work_width), int(fy * work_height)
        labels[y : y + side, x : x + side] = index
    labels.flags.writeable = False
    return labels


class FixedCostSegmenter:
    def __init__(self, model_ms: float, stats_dir: str) -> None:
        self.model_s = model_ms / 1000.0
        self.stats_dir = stats_dir

    def setup(self) -> None:
        pass

    def masks_batch(self, images: list[tuple[np.ndarray, int, int]]) -> list[MaskSet]:
        start = time.time()
        time.sleep(self.model_s * len(images))
        masks = [MaskSet(w, h, labels=_fixed_labels(*image.shape[:2])) for image, w, h in images]
        record(self.stats_dir, "model", "segment", start, time.time(), len(images))
        return masks


class FakeSegmentStage(SegmentStage):
    """The segment stage with a fixed-cost segmenter, run like SAM2: in a Ray actor pool."""

    config_model: ClassVar[type[BaseModel]] = FakeSegmentConfig
    config: FakeSegmentConfig

    @property
    def resources(self) -> Resources:
        return self.config.fake_resources(self.config.max_workers, self.config.batch_size)

    def setup(self) -> None:
        self._segmenter = FixedCostSegmenter(self.config.fake_model_ms, self.config.fake_stats_dir)  # type: ignore[assignment]

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        start = time.time()
        result = super().process_batch(batch, context)
        record(self.config.fake_stats_dir, "batch", "segment", start, time.time(), batch.num_rows)
        return result


class LoggedCaptioner(FixedCostCaptioner):
    def __init__(self, model_ms: float, stats_dir: str) -> None:
        super().__init__(model_ms)
        self.stats_dir = stats_dir

    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        start = time.time()
        results = super().generate(requests)
        record(self.stats_dir, "model", "caption", start, time.time(), len(requests))
        return results


class FakeCaptionStage(CaptionStage):
    """The caption stage (CPU phase included) with a fixed-cost captioner on CPU-only actors."""

    config_model = FakeCaptionConfig
    config: FakeCaptionConfig

    @property
    def resources(self) -> Resources:
        return self.config.fake_resources(self.config.max_workers, self.config.batch_size)

    def _backend_for(self) -> CaptionBackend:
        return LoggedCaptioner(self.config.fake_model_ms, self.config.fake_stats_dir)

    def prepare_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        start = time.time()
        result = super().prepare_batch(batch, context)
        record(self.config.fake_stats_dir, "prepare", "caption", start, time.time(), batch.num_rows)
        return result

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        start = time.time()
        result = super().process_batch(batch, context)
        record(self.config.fake_stats_dir, "batch", "caption", start, time.time(), batch.num_rows)
        return result

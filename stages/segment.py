"""Segment stage: image rows -> the PS3 salient boxes of each image (region rows).

Per image: decode a downscaled working copy (JPEG DCT scaling, ``mask_max_side``), propose masks with
the configured backend, score the candidate grid with the PS3 rule in full-resolution pixels and keep
the top-k non-overlapping boxes among those holding real detail (a floor on edge density measured on the
working copy, so blank images have no salient region whatever the backend).
The classical segmenter works on the working copy. SAM2 sees the image at native resolution (or
``sam2.max_side``), decoded only when its model batch runs, so its crops come from the original pixels;
its masks come back as compact column runs (see ``segmenters/sam2.py`` for the memory bound).
Images are grouped into model batches by the pixels the backend sees; a batch that runs out of memory
is split and retried. An image that cannot be decoded or segmented, or that has no salient box, becomes
an error row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.infra.storage import S3Settings
from ps3_engine.schemas import IMAGE_SCHEMA, REGION_SCHEMA, rows_to_table
from ps3_engine.stages.base import (
    BatchResult,
    Resources,
    ShardContext,
    Stage,
    error_row,
    errors_table,
    unexpected_error_row,
)
from ps3_engine.stages.box_selection import (
    DEFAULT_EDGE_THRESHOLD,
    DEFAULT_MASK_AREA_FLOOR,
    DEFAULT_MIN_EDGE_DENSITY,
    box_edge_density,
    box_scores,
    candidate_boxes,
    edge_pixels,
    select_top_boxes,
)
from ps3_engine.stages.geometry import BoxXYXY
from ps3_engine.stages.imaging import ImageRejected, load_rgb, stored_image_bytes
from ps3_engine.stages.segmenters.classical import ClassicalSegmenter, ClassicalSettings
from ps3_engine.stages.segmenters.sam2 import Sam2Segmenter, Sam2Settings, check_checkpoint_source, is_out_of_memory

logger = logging.getLogger(__name__)


class SegmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["classical", "sam2"] = "classical"
    mask_max_side: int = Field(
        1024, ge=32, description="long side of the working copy (classical masks, detail floor; SAM2: sam2.max_side)"
    )
    box_side_fraction: float = Field(0.2, gt=0, le=1, description="candidate square side / image short side")
    aspect_ratios: tuple[float, ...] = (1.5,)
    grid_stride_fraction: float = Field(1.0, gt=0, le=1, description="1 = paper (touching squares)")
    top_k: int = Field(4, ge=1)
    mask_area_floor: float = Field(DEFAULT_MASK_AREA_FLOOR, gt=0, description="full-res px (paper: 40x40)")
    min_edge_density: float = Field(
        DEFAULT_MIN_EDGE_DENSITY, ge=0, le=1, description="share of edge pixels a box needs (0: no detail floor)"
    )
    edge_threshold: float = Field(DEFAULT_EDGE_THRESHOLD, gt=0, description="Sobel magnitude of an edge pixel")
    max_batch_pixels: int = Field(4 * 1024 * 1024, ge=1, description="working pixels per model batch")
    batch_size: int = Field(8, ge=1, description="images handed to the stage at a time")
    max_workers: int | None = Field(None, ge=1)
    num_gpus: float = Field(1.0, ge=0, description="GPUs per SAM2 worker when a GPU is used")
    sam2: Sam2Settings = Sam2Settings()
    classical: ClassicalSettings = ClassicalSettings()
    s3: S3Settings = S3Settings()

    def backend_settings(self) -> dict[str, Any]:
        backend = self.sam2 if self.backend == "sam2" else self.classical
        # Operational: where the model runs and how its prompts are batched change no output.
        settings = backend.model_dump(mode="json", exclude={"weights_cache_dir", "device", "mask_batch_mb"})
        selection = self.model_dump(
            mode="json",
            include={
                "mask_max_side",
                "box_side_fraction",
                "aspect_ratios",
                "grid_stride_fraction",
                "top_k",
                "mask_area_floor",
                "min_edge_density",
                "edge_threshold",
            },
        )
        return {"backend": settings, "selection": selection}


@dataclass(frozen=True)
class Decoded:
    """One image row on its way through the stage: its stored bytes and its ``(h, w, 3)`` working copy."""

    row: dict[str, Any]
    data: bytes
    working: np.ndarray


def region_id_for(image_id: str, box: BoxXYXY) -> str:
    return hashlib.sha256(f"{image_id}:{box.x0},{box.y0},{box.x1},{box.y1}".encode()).hexdigest()[:32]


def select_regions(
    masks, width: int, height: int, config: SegmentConfig, working_image: np.ndarray | None = None
) -> list[tuple[BoxXYXY, float]]:
    """The PS3 rule on one image's masks: ``(box, score)`` best first.

    With ``working_image`` (the ``(h, w, 3)`` copy the masks were computed on) boxes without real
    detail score 0 (:func:`box_edge_density` below ``config.min_edge_density``), whatever the backend.
    """
    boxes = candidate_boxes(width, height, config.box_side_fraction, config.aspect_ratios, config.grid_stride_fraction)
    scores = box_scores(masks.areas(), masks.inside_areas(boxes), float(width * height), config.mask_area_floor)
    if working_image is not None and config.min_edge_density > 0:
        density = box_edge_density(edge_pixels(working_image, config.edge_threshold), boxes, width, height)
        scores = np.where(density >= config.min_edge_density, scores, 0.0)
    return [(boxes[i], float(scores[i])) for i in select_top_boxes(boxes, scores, config.top_k)]


def pixel_batches(sizes: list[int], budget: int) -> list[list[int]]:
    """Group consecutive indices so each group's pixel sum stays within ``budget`` (at least one each)."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, size in enumerate(sizes):
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        groups.append(current)
    return groups


class SegmentStage(Stage):
    name: ClassVar[str] = "segment"
    input_schema: ClassVar[pa.Schema] = IMAGE_SCHEMA
    output_schema: ClassVar[pa.Schema] = REGION_SCHEMA
    config_model: ClassVar[type[BaseModel]] = SegmentConfig
    operational_fields: ClassVar[frozenset[str]] = frozenset(
        {"max_batch_pixels", "batch_size", "max_workers", "num_gpus", "s3"}
    )

    config: SegmentConfig

    def __init__(self, config: SegmentConfig) -> None:
        super().__init__(config)
        self._segmenter: Sam2Segmenter | ClassicalSegmenter | None = None

    @property
    def resources(self) -> Resources:
        uses_sam2 = self.config.backend == "sam2"
        gpus = self.config.num_gpus if uses_sam2 and self.config.sam2.device != "cpu" else 0.0
        return Resources(
            num_cpus=1.0,
            num_gpus=gpus,
            uses_model=uses_sam2,
            max_workers=self.config.max_workers,
            batch_size=self.config.batch_size,
            gpu_optional=self.config.sam2.device == "auto",
        )

    def preflight(self) -> None:
        """Fail in the driver, before any worker starts, when the SAM2 weights cannot be found."""
        if self.config.backend == "sam2":
            check_checkpoint_source(self.config.sam2)

    def setup(self) -> None:
        if self.config.backend == "sam2":
            self._segmenter = Sam2Segmenter(self.config.sam2, self.config.s3)
        else:
            self._segmenter = ClassicalSegmenter(self.config.classical)
        self._segmenter.setup()

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        if self._segmenter is None:
            self.setup()
        regions: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        decoded: list[Decoded] = []
        for row in batch.to_pylist():
            try:
                data = stored_image_bytes(row, self.config.s3)
                decoded.append(Decoded(row, data, np.asarray(load_rgb(data, max_side=self.config.mask_max_side))))
            except (ImageRejected, OSError, ValueError) as exc:
                errors.append(self._error(context, row, "undecodable", str(exc)))
            except Exception as exc:  # per-item isolation: one item never fails its shard
                errors.append(
                    unexpected_error_row(context, item_id=row["image_id"], input_ref=row["source_ref"], exc=exc)
                )
        sizes = [self._model_pixels(item) for item in decoded]
        for group in pixel_batches(sizes, self.config.max_batch_pixels):
            self._segment_group([decoded[i] for i in group], context, regions, errors)
        return BatchResult(rows_to_table(regions, REGION_SCHEMA), errors_table(errors))

    # -- helpers -------------------------------------------------------------------------------
    def _model_pixels(self, item: Decoded) -> int:
        """Pixels the backend will see for this image (the unit of ``max_batch_pixels``)."""
        if self.config.backend != "sam2":
            return item.working.shape[0] * item.working.shape[1]
        width, height = item.row["width"], item.row["height"]
        cap = self.config.sam2.max_side
        scale = min(1.0, cap / max(width, height)) if cap else 1.0
        return round(width * scale) * round(height * scale)

    def _model_input(self, item: Decoded) -> np.ndarray:
        """The image the backend sees: the working copy, or for SAM2 a fresh native-resolution decode."""
        if self.config.backend != "sam2":
            return item.working
        return np.asarray(load_rgb(item.data, max_side=self.config.sam2.max_side))

    def _error(
        self, context: ShardContext, row: dict[str, Any], reason: str, message: str, category: str = "failed"
    ) -> dict[str, Any]:
        return error_row(
            context,
            item_id=row["image_id"],
            input_ref=row["source_ref"],
            reason=reason,
            message=message,
            category=category,
        )

    def _segment_group(
        self, group: list[Decoded], context: ShardContext, regions: list[dict[str, Any]], errors: list[dict[str, Any]]
    ) -> None:
        """Decode what the backend sees for one pixel-budgeted group (so only one group's native images
        are in memory at a time), then segment it."""
        ready: list[tuple[Decoded, np.ndarray]] = []
        for item in group:
            try:
                ready.append((item, self._model_input(item)))
            except (ImageRejected, OSError, ValueError) as exc:
                errors.append(self._error(context, item.row, "undecodable", str(exc)))
            except Exception as exc:  # per-item isolation
                row = item.row
                errors.append(
                    unexpected_error_row(context, item_id=row["image_id"], input_ref=row["source_ref"], exc=exc)
                )
        if ready:
            self._propose(ready, context, regions, errors)

    def _propose(
        self,
        group: list[tuple[Decoded, np.ndarray]],
        context: ShardContext,
        regions: list[dict[str, Any]],
        errors: list[dict[str, Any]],
    ) -> None:
        """Segment a decoded group; on out-of-memory split it in halves and retry."""
        assert self._segmenter is not None
        try:
            results = self._segmenter.masks_batch(
                [(image, item.row["width"], item.row["height"]) for item, image in group]
            )
        except Exception as exc:  # any backend failure is retried per image, so one image cannot fail the group
            if not is_out_of_memory(exc):
                if len(group) == 1:
                    row = group[0][0].row
                    errors.append(self._error(context, row, "segmenter_error", f"{type(exc).__name__}: {exc}"))
                    return
                for entry in group:
                    self._propose([entry], context, regions, errors)
                return
            if len(group) == 1:
                errors.append(self._error(context, group[0][0].row, "out_of_memory", str(exc)))
                return
            middle = len(group) // 2
            logger.warning("segment: out of memory on %d images, splitting", len(group))
            self._propose(group[:middle], context, regions, errors)
            self._propose(group[middle:], context, regions, errors)
            return
        settings_json = json.dumps(self.config.backend_settings(), sort_keys=True)
        for (item, _), masks in zip(group, results, strict=True):
            row = item.row
            try:
                selected = select_regions(masks, row["width"], row["height"], self.config, item.working)
            except Exception as exc:
                errors.append(
                    unexpected_error_row(context, item_id=row["image_id"], input_ref=row["source_ref"], exc=exc)
                )
                continue
            if not selected:
                errors.append(
                    self._error(
                        context,
                        row,
                        "no_salient_region",
                        f"{masks.num_masks} masks, no box with a positive score and real detail "
                        f"(edge density >= {self.config.min_edge_density})",
                        "filtered",
                    )
                )
                continue
            for rank, (box, score) in enumerate(selected):
                regions.append(
                    {
                        "region_id": region_id_for(row["image_id"], box),
                        "image_id": row["image_id"],
                        "shard_id": context.shard_id,
                        "x0": box.x0,
                        "y0": box.y0,
                        "x1": box.x1,
                        "y1": box.y1,
                        "score": score,
                        "rank": rank,
                        "backend": self.config.backend,
                        "backend_settings_json": settings_json,
                    }
                )

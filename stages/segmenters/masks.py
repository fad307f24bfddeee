"""Masks at a working resolution, measured in full-resolution pixels for the PS3 box score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ps3_engine.stages.geometry import BoxXYXY


@dataclass(frozen=True)
class MaskSet:
    """Masks of one image computed on a downscaled copy (``work_width`` x ``work_height``).

    Exactly one representation is set: ``stack`` (``(N, h, w)`` bool; masks may overlap, e.g. SAM) or
    ``labels`` (``(h, w)`` int, one segment id per pixel; a partition, e.g. graph segmentation).
    Areas are reported in full-resolution pixels so scores and floors mean the same at any working size.
    """

    full_width: int
    full_height: int
    stack: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.stack is None) == (self.labels is None):
            raise ValueError("MaskSet needs exactly one of stack or labels")

    @property
    def work_shape(self) -> tuple[int, int]:
        source = self.labels if self.labels is not None else self.stack
        assert source is not None
        return source.shape[-2], source.shape[-1]

    @property
    def num_masks(self) -> int:
        if self.stack is not None:
            return int(self.stack.shape[0])
        assert self.labels is not None
        return int(self.labels.max()) + 1 if self.labels.size else 0

    @property
    def pixel_scale(self) -> float:
        """Full-resolution pixels per working pixel."""
        work_h, work_w = self.work_shape
        return (self.full_width / work_w) * (self.full_height / work_h)

    def _counts(self, region: tuple[slice, slice]) -> np.ndarray:
        if self.stack is not None:
            return self.stack[:, region[0], region[1]].sum(axis=(1, 2), dtype=np.int64)
        assert self.labels is not None
        return np.bincount(self.labels[region].ravel(), minlength=self.num_masks).astype(np.int64)

    def areas(self) -> np.ndarray:
        """``(N,)`` full-resolution area of each mask."""
        work_h, work_w = self.work_shape
        return self._counts((slice(0, work_h), slice(0, work_w))) * self.pixel_scale

    def inside_areas(self, boxes: list[BoxXYXY]) -> np.ndarray:
        """``(num_boxes, N)`` full-resolution area of each mask inside each full-resolution box."""
        work_h, work_w = self.work_shape
        sx, sy = work_w / self.full_width, work_h / self.full_height
        rows = []
        for box in boxes:
            region = (slice(round(box.y0 * sy), round(box.y1 * sy)), slice(round(box.x0 * sx), round(box.x1 * sx)))
            rows.append(self._counts(region))
        if not rows:
            return np.zeros((0, self.num_masks))
        return np.stack(rows) * self.pixel_scale

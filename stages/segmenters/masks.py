"""Masks of one image, measured in full-resolution pixels for the PS3 box score.

Three representations share one interface (``areas``, ``inside_areas``): a dense boolean stack, a label
image (a partition), and column runs, the compact form SAM2's automatic mask generator can emit at native
resolution (a 4K image's dense boolean mask is 8 MB; its runs are usually a few tens of kB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ps3_engine.stages.geometry import BoxXYXY


@dataclass(frozen=True)
class ColumnRuns:
    """Masks stored as vertical runs of ones: run ``i`` covers rows ``[row_start[i], row_end[i])`` of
    column ``column[i]`` in mask ``mask_index[i]``, on a ``height`` x ``width`` grid.

    This is the column-major (COCO/SAM "uncompressed") RLE with each run cut at column ends, so a box
    (a row range times a column range) intersects a run in one clipped interval. Runs are sorted by
    column so the runs inside a column range are one contiguous slice.
    """

    height: int
    width: int
    num_masks: int
    mask_index: np.ndarray
    column: np.ndarray
    row_start: np.ndarray
    row_end: np.ndarray

    @classmethod
    def from_rles(cls, rles: list[dict[str, Any]], height: int, width: int) -> ColumnRuns:
        """From uncompressed column-major RLEs (``{"size": [h, w], "counts": [zeros, ones, zeros, ...]}``,
        the format of ``sam2.utils.amg.mask_to_rle_pytorch`` and pycocotools).

        Raises:
            ValueError: an RLE's size differs from ``(height, width)`` or its counts do not sum to h*w.
        """
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for index, rle in enumerate(rles):
            if list(rle["size"]) != [height, width]:
                raise ValueError(f"RLE {index} has size {rle['size']}, expected {[height, width]}")
            counts = np.asarray(rle["counts"], dtype=np.int64)
            if int(counts.sum()) != height * width:
                raise ValueError(f"RLE {index} covers {int(counts.sum())} pixels, expected {height * width}")
            column, row_start, row_end = _split_at_columns(counts, height)
            parts.append((np.full(column.shape, index, dtype=np.int32), column, row_start, row_end))
        if parts:
            mask_index, column, row_start, row_end = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            mask_index, column, row_start, row_end = (np.zeros(0, dtype=np.int32) for _ in range(4))
        order = np.argsort(column, kind="stable")
        return cls(height, width, len(rles), mask_index[order], column[order], row_start[order], row_end[order])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.mask_index, self.column, self.row_start, self.row_end))

    def counts(self) -> np.ndarray:
        """``(num_masks,)`` pixels of each mask (working grid)."""
        return np.bincount(self.mask_index, weights=self.row_end - self.row_start, minlength=self.num_masks)

    def counts_in(self, rows: tuple[int, int], columns: tuple[int, int]) -> np.ndarray:
        """``(num_masks,)`` pixels of each mask inside rows ``[r0, r1)`` x columns ``[c0, c1)`` (working grid)."""
        first, last = np.searchsorted(self.column, columns, side="left")
        start = np.maximum(self.row_start[first:last], rows[0])
        end = np.minimum(self.row_end[first:last], rows[1])
        inside = np.maximum(end - start, 0)
        return np.bincount(self.mask_index[first:last], weights=inside, minlength=self.num_masks)


def _split_at_columns(counts: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of ones of one column-major RLE, cut where they cross into the next column."""
    ends = np.cumsum(counts)
    starts = ends - counts
    ones_start, ones_end = starts[1::2], ends[1::2]  # counts alternate zeros, ones, zeros, ...
    nonempty = ones_end > ones_start
    ones_start, ones_end = ones_start[nonempty], ones_end[nonempty]
    first_col = ones_start // height
    spans = (ones_end - 1) // height - first_col + 1
    run = np.repeat(np.arange(len(spans)), spans)
    column = first_col[run] + np.arange(int(spans.sum())) - np.repeat(np.cumsum(spans) - spans, spans)
    column_origin = column * height
    row_start = np.maximum(ones_start[run], column_origin) - column_origin
    row_end = np.minimum(ones_end[run], column_origin + height) - column_origin
    return column.astype(np.int32), row_start.astype(np.int32), row_end.astype(np.int32)


@dataclass(frozen=True)
class MaskSet:
    """Masks of one image computed on a ``work_width`` x ``work_height`` grid (the full image or a copy).

    Exactly one representation is set: ``stack`` (``(N, h, w)`` bool; masks may overlap, e.g. SAM),
    ``labels`` (``(h, w)`` int, one segment id per pixel; a partition, e.g. graph segmentation) or
    ``runs`` (:class:`ColumnRuns`; overlapping masks, compact, e.g. SAM2 at native resolution).
    Areas are reported in full-resolution pixels so scores and floors mean the same at any working size,
    and the three representations of the same masks give identical numbers.
    """

    full_width: int
    full_height: int
    stack: np.ndarray | None = None
    labels: np.ndarray | None = None
    runs: ColumnRuns | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.stack, self.labels, self.runs)) != 1:
            raise ValueError("MaskSet needs exactly one of stack, labels or runs")

    @property
    def work_shape(self) -> tuple[int, int]:
        if self.runs is not None:
            return self.runs.height, self.runs.width
        source = self.labels if self.labels is not None else self.stack
        assert source is not None
        return source.shape[-2], source.shape[-1]

    @property
    def num_masks(self) -> int:
        if self.stack is not None:
            return int(self.stack.shape[0])
        if self.runs is not None:
            return self.runs.num_masks
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
        if self.runs is not None:
            work_h, work_w = self.work_shape
            rows, columns = region[0].indices(work_h)[:2], region[1].indices(work_w)[:2]
            return self.runs.counts_in(rows, columns).astype(np.int64)
        assert self.labels is not None
        return np.bincount(self.labels[region].ravel(), minlength=self.num_masks).astype(np.int64)

    def areas(self) -> np.ndarray:
        """``(N,)`` full-resolution area of each mask."""
        if self.runs is not None:
            return self.runs.counts() * self.pixel_scale
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

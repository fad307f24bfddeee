"""The PS3 salient-box rule (paper §2.1 / App. A), as pure functions.

1. Candidates: a grid of touching, non-overlapping squares whose side is a fraction of the image's
   short side (paper: 1/5), plus, at each grid position, boxes of the same area with aspect ratios
   1.5:1 and 1:1.5 centred on the square (shifted to stay inside the image).
2. Score of a box: sum over masks m overlapping it of
   ``Area(image) / max(Area(m), floor) * Area(m ∩ box) / Area(m)`` (floor: 40x40 px), so small masks,
   i.e. fine detail, weigh most.
3. Selection: greedy top-k by score among boxes with a positive score, skipping any box that overlaps
   one already selected.
4. Detail floor (ours, not the paper's): a box is a candidate only if it holds real detail, i.e. at
   least ``min_edge_density`` of its pixels are edge pixels (Sobel magnitude of the grey working copy
   above ``edge_threshold``). The PS3 score alone cannot tell: one mask covering a blank image still
   scores every box (box area / image area: 0.03 on a white 2048x1536 JPEG), and a graph segmenter cuts
   a smooth gradient into hundreds of thin bands that score like texture (11.7k vs 10k-120k for the
   planted scenes). The floor is computed from the image, so it holds for every mask backend.
All areas are in full-resolution pixels of the (EXIF-oriented) image.

Calibration of the detail floor (``tests/stages/test_segment.py::test_detail_floor_calibration``; best
box per image, 2048x1536 JPEGs at quality 90, working copy 1024 px): white, black, grey noise sigma 2 and 8, a
horizontal gradient and a vertical "sky" gradient all have edge density 0.000 at threshold 0.05; a
white page with one short word 0.0064; an image of two flat halves 0.0106 (one straight edge); the
repository's planted scenes 0.18-0.20 (0.20-0.49 at 320x240). The default floor 0.002 sits well
below a single word and well above every blank or near-blank image.
"""

from __future__ import annotations

import math

import numpy as np

from ps3_engine.stages.geometry import BoxXYXY, box_centered_at, boxes_overlap

DEFAULT_MASK_AREA_FLOOR = 40 * 40
# Sobel magnitude (grey in [0, 1], skimage's normalisation) above which a pixel is an edge: a step of
# about 0.1 (25 grey levels) between neighbours; JPEG ringing, sensor noise and gradients stay below.
DEFAULT_EDGE_THRESHOLD = 0.05
# Share of a box's pixels that must be edges for the box to hold real detail (see the calibration above).
DEFAULT_MIN_EDGE_DENSITY = 0.002


def candidate_boxes(
    width: int,
    height: int,
    side_fraction: float = 0.2,
    aspect_ratios: tuple[float, ...] = (1.5,),
    stride_fraction: float = 1.0,
) -> list[BoxXYXY]:
    """Grid squares (side = ``side_fraction`` x short side) plus same-area w:h variants at each position.

    ``stride_fraction`` = 1 is the paper's grid (stride = side: squares touch, never overlap); smaller
    values add positions in between (candidates then overlap, the selected boxes still do not).
    The grid is centred: the leftover margin is split evenly on both ends.
    Each ratio ``r`` adds an ``r:1`` and a ``1:r`` box at every position.
    """
    if not 0 < side_fraction <= 1:
        raise ValueError(f"side_fraction must be in (0, 1], got {side_fraction}")
    if not 0 < stride_fraction <= 1:
        raise ValueError(f"stride_fraction must be in (0, 1], got {stride_fraction}")
    side = max(1, round(min(width, height) * side_fraction))
    stride = max(1, round(side * stride_fraction))
    cols, rows = (width - side) // stride + 1, (height - side) // stride + 1
    offset_x = (width - (side + (cols - 1) * stride)) // 2
    offset_y = (height - (side + (rows - 1) * stride)) // 2
    shapes = [(side, side)]
    for ratio in aspect_ratios:
        long_side = round(side * math.sqrt(ratio))
        short_side = max(1, round(side * side / long_side))
        for box_w, box_h in ((long_side, short_side), (short_side, long_side)):
            # A variant that cannot fit would have to shrink and lose the equal-area property: skip it.
            if box_w <= width and box_h <= height and (box_w, box_h) not in shapes:
                shapes.append((box_w, box_h))
    boxes = []
    for row in range(rows):
        for col in range(cols):
            cx = offset_x + col * stride + side / 2
            cy = offset_y + row * stride + side / 2
            boxes.extend(box_centered_at(cx, cy, w, h, width, height) for w, h in shapes)
    return boxes


def box_scores(
    mask_areas: np.ndarray, inside_areas: np.ndarray, image_area: float, floor: float = DEFAULT_MASK_AREA_FLOOR
) -> np.ndarray:
    """PS3 saliency of each box.

    Args:
        mask_areas: ``(num_masks,)`` full-resolution area of each mask.
        inside_areas: ``(num_boxes, num_masks)`` area of each mask inside each box.
        image_area: full-resolution image area.
        floor: masks smaller than this count as this large (paper: 40x40 px).
    Returns:
        ``(num_boxes,)`` scores (0 for boxes no mask touches).
    """
    mask_areas = np.asarray(mask_areas, dtype=np.float64)
    inside_areas = np.asarray(inside_areas, dtype=np.float64)
    if mask_areas.size == 0:
        return np.zeros(inside_areas.shape[0])
    weight = image_area / np.maximum(mask_areas, floor)
    fraction_inside = np.divide(inside_areas, mask_areas, out=np.zeros_like(inside_areas), where=mask_areas > 0)
    return (fraction_inside * weight).sum(axis=1)


def select_top_boxes(boxes: list[BoxXYXY], scores: np.ndarray, top_k: int) -> list[int]:
    """Indices of up to ``top_k`` positive-score boxes, best first, no two overlapping.

    Ties break by position (top-left first) so the result is deterministic.
    """
    order = sorted(range(len(boxes)), key=lambda i: (-float(scores[i]), boxes[i].y0, boxes[i].x0, boxes[i].x1))
    chosen: list[int] = []
    for index in order:
        if len(chosen) == top_k or scores[index] <= 0:
            break
        if not any(boxes_overlap(boxes[index], boxes[other]) for other in chosen):
            chosen.append(index)
    return chosen


def edge_pixels(image_rgb: np.ndarray, threshold: float = DEFAULT_EDGE_THRESHOLD) -> np.ndarray:
    """``(h, w)`` bool: pixels of a working copy (``(h, w, 3)`` uint8) whose Sobel magnitude exceeds ``threshold``."""
    from skimage.filters import sobel

    grey = np.asarray(image_rgb, dtype=np.float32).mean(axis=-1) / 255.0
    return sobel(grey) > threshold


def box_edge_density(edges: np.ndarray, boxes: list[BoxXYXY], full_width: int, full_height: int) -> np.ndarray:
    """``(num_boxes,)`` share of edge pixels inside each full-resolution box (``edges`` at working size).

    Box sums come from a summed-area table, so the cost is one pass over the image plus O(1) per box.
    """
    work_h, work_w = edges.shape
    table = np.zeros((work_h + 1, work_w + 1), dtype=np.int64)
    table[1:, 1:] = edges.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    sx, sy = work_w / full_width, work_h / full_height
    densities = np.zeros(len(boxes))
    for index, box in enumerate(boxes):
        x0, x1 = round(box.x0 * sx), max(round(box.x1 * sx), round(box.x0 * sx) + 1)
        y0, y1 = round(box.y0 * sy), max(round(box.y1 * sy), round(box.y0 * sy) + 1)
        x1, y1 = min(x1, work_w), min(y1, work_h)
        count = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        densities[index] = count / max(1, (x1 - x0) * (y1 - y0))
    return densities

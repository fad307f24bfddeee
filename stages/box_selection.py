"""The PS3 salient-box rule (paper §2.1 / App. A), as pure functions.

1. Candidates: a grid of touching, non-overlapping squares whose side is a fraction of the image's
   short side (paper: 1/5), plus, at each grid position, boxes of the same area with aspect ratios
   1.5:1 and 1:1.5 centred on the square (shifted to stay inside the image).
2. Score of a box: sum over masks m overlapping it of
   ``Area(image) / max(Area(m), floor) * Area(m ∩ box) / Area(m)`` (floor: 40x40 px), so small masks,
   i.e. fine detail, weigh most.
3. Selection: greedy top-k by score among boxes with a positive score, skipping any box that overlaps
   one already selected.
All areas are in full-resolution pixels of the (EXIF-oriented) image.
"""

from __future__ import annotations

import math

import numpy as np

from ps3_engine.stages.geometry import BoxXYXY, box_centered_at, boxes_overlap

DEFAULT_MASK_AREA_FLOOR = 40 * 40


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

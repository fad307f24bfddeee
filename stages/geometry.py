"""Pure box geometry. Boxes are ``BoxXYXY`` in integer pixels, half-open: ``[x0, x1) x [y0, y1)``."""

from __future__ import annotations

import math
from typing import NamedTuple


class BoxXYXY(NamedTuple):
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)


def intersection_area(a: BoxXYXY, b: BoxXYXY) -> int:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0


def boxes_overlap(a: BoxXYXY, b: BoxXYXY) -> bool:
    """True when the boxes share area; boxes that only touch along an edge do not overlap."""
    return intersection_area(a, b) > 0


def iou(a: BoxXYXY, b: BoxXYXY) -> float:
    inter = intersection_area(a, b)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def is_inside(box: BoxXYXY, width: int, height: int) -> bool:
    return 0 <= box.x0 < box.x1 <= width and 0 <= box.y0 < box.y1 <= height


def box_centered_at(cx: float, cy: float, box_w: int, box_h: int, width: int, height: int) -> BoxXYXY:
    """A ``box_w`` x ``box_h`` box centred at (cx, cy), shifted (never shrunk) to lie inside the image.

    Requires ``box_w <= width`` and ``box_h <= height``.
    """
    x0 = min(max(round(cx - box_w / 2), 0), width - box_w)
    y0 = min(max(round(cy - box_h / 2), 0), height - box_h)
    return BoxXYXY(x0, y0, x0 + box_w, y0 + box_h)


def scale_box(box: BoxXYXY, scale_x: float, scale_y: float, width: int, height: int) -> BoxXYXY:
    """Map a box to a resized image (``new = old * scale``), rounded outward and clipped to the image."""
    x0 = max(0, math.floor(box.x0 * scale_x))
    y0 = max(0, math.floor(box.y0 * scale_y))
    x1 = min(width, max(x0 + 1, math.ceil(box.x1 * scale_x)))
    y1 = min(height, max(y0 + 1, math.ceil(box.y1 * scale_y)))
    return BoxXYXY(x0, y0, x1, y1)


def fit_to_pixel_budget(
    width: int, height: int, max_pixels: int, min_pixels: int = 1, factor: int = 1
) -> tuple[int, int]:
    """Size of an image scaled (aspect kept) so ``w * h`` lies in ``[min_pixels, max_pixels]``.

    Sides are rounded to multiples of ``factor`` (Qwen2-VL uses 28: patch 14 x merge 2) and never drop
    below ``factor``. Images already inside the budget keep their size up to that rounding.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    if max_pixels < factor * factor or min_pixels > max_pixels:
        raise ValueError(f"pixel budget [{min_pixels}, {max_pixels}] cannot hold a {factor}x{factor} image")
    scale = 1.0
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    elif width * height < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
    # Scaling up to reach min_pixels rounds sides up (as Qwen2-VL's own resize does) so the result
    # cannot fall back below the floor; otherwise round to the nearest multiple.
    to_grid = math.ceil if scale > 1.0 else round
    new_w = max(factor, to_grid(width * scale / factor) * factor)
    new_h = max(factor, to_grid(height * scale / factor) * factor)
    # Rounding up can overshoot the budget; step the longer side down until it fits.
    while new_w * new_h > max_pixels:
        if new_w >= new_h and new_w > factor:
            new_w -= factor
        elif new_h > factor:
            new_h -= factor
        else:
            break
    return new_w, new_h

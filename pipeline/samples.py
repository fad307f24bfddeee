"""Synthetic high-resolution scenes: the embedded default input of the demo and of tests.

A scene is a smooth gradient background with a few large shapes and some small, detailed patches
(tiny text and dense small shapes), i.e. what the PS3 data engine is meant to find.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def synthetic_scene(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    c0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = ((xs / max(width - 1, 1)) * 0.6 + (ys / max(height - 1, 1)) * 0.4)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randint(0, width - short // 4), rng.randint(0, height - short // 4)
        size = rng.randint(short // 10, short // 4)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + size, y0 + size], fill=colour)
    font = ImageFont.load_default(size=max(10, short // 120))
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randint(0, width - short // 6), rng.randint(0, height - short // 6)
        for line in range(4):
            words = " ".join(rng.choice(["ps3", "4K", "scan", "label", "note", "id", "42", "data"]) for _ in range(4))
            draw.text((x0, y0 + line * short // 90), words, fill=(0, 0, 0), font=font)
        for _ in range(12):
            cx, cy = x0 + rng.randint(0, short // 8), y0 + rng.randint(short // 25, short // 8)
            r = rng.randint(2, max(3, short // 200))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def write_scenes(
    folder: Path, count: int, size: tuple[int, int] = (2400, 1600), quality: int = 90, seed: int = 0
) -> list[Path]:
    """Write ``count`` JPEG scenes (alternating landscape/portrait) into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = size if index % 2 == 0 else size[::-1]
        path = folder / f"scene-{seed + index:05d}.jpg"
        if not path.exists():
            synthetic_scene(width, height, seed + index).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def planted_scene(width: int, height: int, seed: int, num_patches: int = 3) -> tuple[Image.Image, list[tuple]]:
    """A smooth scene with ``num_patches`` small detailed patches (tiny text and dots) planted at random.

    Returns the image and the planted patches' ``(x0, y0, x1, y1)`` boxes, the ground truth a salient
    region proposer should find. Large flat shapes are added as distractors.
    """
    rng = random.Random(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    c0 = np.array([rng.randint(40, 215) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(40, 215) for _ in range(3)], dtype=np.float32)
    t = ((xs / max(width - 1, 1)) * 0.5 + (ys / max(height - 1, 1)) * 0.5)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(3):
        size = rng.randint(short // 8, short // 4)
        x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
        draw.ellipse([x0, y0, x0 + size, y0 + size], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    patch = max(32, short // 8)
    font = ImageFont.load_default(size=max(8, patch // 14))
    planted: list[tuple] = []
    attempts = 0
    while len(planted) < num_patches and attempts < 1000:
        attempts += 1
        x0, y0 = rng.randint(0, width - patch), rng.randint(0, height - patch)
        box = (x0, y0, x0 + patch, y0 + patch)
        if any(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for b in planted):
            continue
        draw.rectangle(box, fill=(245, 245, 240))
        line_height = max(9, patch // 10)
        for line in range(patch // line_height - 1):
            text = " ".join(rng.choice(["id", "42", "scan", "4K", "lot", "7b", "ps3"]) for _ in range(6))
            draw.text((x0 + 2, y0 + 2 + line * line_height), text, fill=(10, 10, 10), font=font)
        for _ in range(20):
            cx, cy = x0 + rng.randint(2, patch - 3), y0 + rng.randint(2, patch - 3)
            radius = rng.randint(1, max(2, patch // 40))
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        planted.append(box)
    return img, planted

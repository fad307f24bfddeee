"""Synthetic grounded-QA samples for tests and the ``debug`` recipe: four coloured squares, one per quadrant.

Each image shows four squares of four different colours, one in each quadrant. The question names one
colour ("Where is the red square?"), the answer names its quadrant, and the evidence box is that
square. Every colour is in every image, so only a prompt-driven (top-down) selection can find the
evidence: bottom-up saliency sees four equally salient squares.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ps3_engine.training.tiny_captioner import COLOURS
from ps3_engine.training.vila_hd.data import EvidenceBox, Turn, VilaHDSample

SQUARE_COLOURS = ("red", "green", "blue", "yellow")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SYNTHETIC_QUESTION = "Find the square coloured {colour}"
BACKGROUND = (128, 128, 128)


def describe_quadrant(colour: str, quadrant: int) -> str:
    return f"The {colour} square is in the {QUADRANTS[quadrant]}."


def quadrant_box(quadrant: int, size: int, margin: int) -> EvidenceBox:
    """The square drawn in ``quadrant`` (0..3, raster order) of a ``size`` image, xyxy pixels, half-open."""
    half = size // 2
    x0, y0 = (quadrant % 2) * half + margin, (quadrant // 2) * half + margin
    return EvidenceBox(x0=x0, y0=y0, x1=x0 + half - 2 * margin, y1=y0 + half - 2 * margin)


def quadrant_scene(colours: list[str], size: int, margin: int) -> bytes:
    """PNG bytes of a grey image with ``colours[q]`` filling quadrant q's square."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for quadrant, colour in enumerate(colours):
        box = quadrant_box(quadrant, size, margin)
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def quadrant_samples(
    num_samples: int, size: int = 224, seed: int = 0, selection_share: float = 0.0, margin: int | None = None
) -> list[VilaHDSample]:
    """``num_samples`` grounded QA samples (a ``selection_share`` of them selection-only, without answers)."""
    rng = np.random.default_rng(seed)
    margin = size // 28 if margin is None else margin
    samples = []
    for index in range(num_samples):
        colours = [SQUARE_COLOURS[i] for i in rng.permutation(len(SQUARE_COLOURS))]
        quadrant = int(rng.integers(4))
        colour = colours[quadrant]
        turns = [Turn(role="user", text=SYNTHETIC_QUESTION.format(colour=colour))]
        selection_only = bool(rng.random() < selection_share)
        if not selection_only:
            turns.append(Turn(role="assistant", text=describe_quadrant(colour, quadrant)))
        samples.append(
            VilaHDSample(
                sample_id=f"quadrants-{seed}-{index}",
                kind="selection" if selection_only else "grounded_qa",
                source="synthetic-quadrants",
                image_bytes=quadrant_scene(colours, size, margin),
                image_ref=None,
                width=size,
                height=size,
                turns=turns,
                evidence=[quadrant_box(quadrant, size, margin)],
            )
        )
    return samples

"""Pure geometry and grouping of page words: PDF points -> pixels, words -> sentence and word-run regions.

The two region schemes of the paper ([P2] App. A):

* ``sentence`` (IDL): one sentence is a region, its box is the union of its words' boxes, its text the
  sentence. Sentences end at a word ending in ``.``, ``!`` or ``?`` (closing quotes or brackets may
  follow), at the end of a text block, and after ``max_words`` words (a run-on without punctuation).
  Abbreviations such as "e.g." therefore end a sentence; the paper's OCR sentences are no finer.
* ``word_run`` (PDFA): ``run_length`` consecutive words (paper: 15), their union box and the joined words.
  Runs step by ``stride`` words, cross line breaks but not text blocks (a run spanning two paragraphs or
  columns would get a box covering unrelated text), and a short run at a block's end is kept when it
  has at least ``min_words`` words.

Every box is ``BoxXYXY`` in integer rendered-page pixels, half-open, rounded outward and clipped to the page.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from ps3_engine.stages.geometry import BoxXYXY

Scheme = Literal["sentence", "word_run"]
SCHEMES: tuple[Scheme, ...] = ("sentence", "word_run")

_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


@dataclass(frozen=True)
class Word:
    """One word with its box in rendered-page pixels (floats, xyxy) and its line and block in reading order."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float
    line: int
    block: int


@dataclass(frozen=True)
class TextRegion:
    """A region-caption pair: the union box of ``num_words`` words starting at ``first_word``."""

    scheme: Scheme
    box: BoxXYXY
    text: str
    first_word: int
    num_words: int


@dataclass(frozen=True)
class PageGeometry:
    """How PDF page space maps onto the rendered bitmap.

    ``page_box`` is the visible page area in PDF points ``(left, bottom, right, top)`` (pdfium's crop box
    clipped to the media box), ``rotation`` the page's clockwise display rotation in degrees, and
    ``width``/``height`` the bitmap size, which is the rotated page box times ``dpi / 72``.
    """

    page_box: tuple[float, float, float, float]
    rotation: int
    width: int
    height: int

    @property
    def displayed_size_pt(self) -> tuple[float, float]:
        left, bottom, right, top = self.page_box
        if self.rotation in (90, 270):
            return top - bottom, right - left
        return right - left, top - bottom


def rendered_size(page_box: tuple[float, float, float, float], rotation: int, dpi: float) -> tuple[int, int]:
    """Bitmap size of a page rendered at ``dpi``: displayed points x dpi / 72, rounded, at least 1 px."""
    geometry = PageGeometry(page_box, rotation, 1, 1)
    width_pt, height_pt = geometry.displayed_size_pt
    scale = dpi / 72.0
    return max(1, round(width_pt * scale)), max(1, round(height_pt * scale))


def points_to_pixels(boxes_ltrb: np.ndarray, geometry: PageGeometry) -> np.ndarray:
    """Map ``(N, 4)`` PDF-space boxes ``(left, bottom, right, top)`` to ``(N, 4)`` float pixel ``xyxy`` boxes.

    Same mapping as pdfium's ``FPDF_PageToDevice`` for a bitmap of ``geometry.width x geometry.height``
    (the page box stretched onto the bitmap, then rotated clockwise by the page rotation; y points down).
    """
    if geometry.rotation not in (0, 90, 180, 270):
        raise ValueError(f"page rotation must be 0, 90, 180 or 270, got {geometry.rotation}")
    boxes = np.asarray(boxes_ltrb, dtype=np.float64).reshape(-1, 4)
    left, bottom, right, top = geometry.page_box
    width_pt, height_pt = geometry.displayed_size_pt
    sx, sy = geometry.width / width_pt, geometry.height / height_pt
    bl, bb, br, bt = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    if geometry.rotation == 0:
        xs, ys = (bl - left, br - left), (top - bt, top - bb)
    elif geometry.rotation == 90:
        xs, ys = (bb - bottom, bt - bottom), (bl - left, br - left)
    elif geometry.rotation == 180:
        xs, ys = (right - br, right - bl), (bb - bottom, bt - bottom)
    else:
        xs, ys = (top - bt, top - bb), (right - br, right - bl)
    x0, x1 = np.minimum(*xs) * sx, np.maximum(*xs) * sx
    y0, y1 = np.minimum(*ys) * sy, np.maximum(*ys) * sy
    return np.stack([x0, y0, x1, y1], axis=1)


def union_box(words: Sequence[Word], width: int, height: int) -> BoxXYXY | None:
    """Union of the words' boxes, rounded outward to whole pixels and clipped; None when it is empty."""
    x0 = max(0, math.floor(min(w.x0 for w in words)))
    y0 = max(0, math.floor(min(w.y0 for w in words)))
    x1 = min(width, math.ceil(max(w.x1 for w in words)))
    y1 = min(height, math.ceil(max(w.y1 for w in words)))
    if x1 <= x0 or y1 <= y0:
        return None
    return BoxXYXY(x0, y0, x1, y1)


def assign_blocks(words: Sequence[Word], gap_factor: float = 0.8) -> list[Word]:
    """Number text blocks from line geometry, for word sources that only know lines (the text layer).

    A new block starts at a line that is separated from the previous one by more than ``gap_factor``
    times the previous line's height (a blank line, a paragraph gap), or that starts above the previous
    line (a new column or a jump back up the page).
    """
    out: list[Word] = []
    block = 0
    previous: tuple[float, float] | None = None  # (y0, y1) of the previous line
    for line_words in _group_by(words, lambda w: w.line):
        y0 = min(w.y0 for w in line_words)
        y1 = max(w.y1 for w in line_words)
        if previous is not None:
            gap = y0 - previous[1]
            if gap > gap_factor * (previous[1] - previous[0]) or y1 <= previous[0]:
                block += 1
        previous = (y0, y1)
        out.extend(replace(w, block=block) for w in line_words)
    return out


def sentence_regions(words: Sequence[Word], width: int, height: int, max_words: int = 64) -> list[TextRegion]:
    """Sentences of the page (see the module docstring) as regions, in reading order."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    regions: list[TextRegion] = []
    start = 0
    for index, word in enumerate(words):
        ends_block = index + 1 == len(words) or words[index + 1].block != word.block
        if ends_block or _SENTENCE_END.search(word.text) or index + 1 - start >= max_words:
            _append_region(regions, "sentence", words, start, index + 1, width, height)
            start = index + 1
    return regions


def word_run_regions(
    words: Sequence[Word], width: int, height: int, run_length: int = 15, stride: int = 15, min_words: int = 5
) -> list[TextRegion]:
    """Runs of ``run_length`` consecutive words within each block (see the module docstring)."""
    if run_length < 1 or stride < 1 or min_words < 1:
        raise ValueError(f"run_length, stride and min_words must be >= 1, got {run_length}, {stride}, {min_words}")
    regions: list[TextRegion] = []
    offset = 0
    for block_words in _group_by(words, lambda w: w.block):
        for start in range(0, len(block_words), stride):
            stop = min(start + run_length, len(block_words))
            if stop - start >= min(min_words, run_length):
                _append_region(regions, "word_run", words, offset + start, offset + stop, width, height)
            if stop == len(block_words):
                break
        offset += len(block_words)
    return regions


def _append_region(
    regions: list[TextRegion], scheme: Scheme, words: Sequence[Word], start: int, stop: int, width: int, height: int
) -> None:
    chosen = words[start:stop]
    box = union_box(chosen, width, height)
    if box is not None:
        regions.append(TextRegion(scheme, box, " ".join(w.text for w in chosen), start, stop - start))


def _group_by(words: Sequence[Word], key) -> Iterator[list[Word]]:
    """Consecutive runs of words with the same ``key``."""
    group: list[Word] = []
    for word in words:
        if group and key(word) != key(group[-1]):
            yield group
            group = []
        group.append(word)
    if group:
        yield group

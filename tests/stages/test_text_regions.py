"""Pure document geometry and grouping: points -> pixels (checked against pdfium), sentences, word runs."""

from __future__ import annotations

import ctypes

import numpy as np
import pypdfium2.raw as pdfium_c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ps3_engine.stages.documents.ocr import words_from_tesseract_data
from ps3_engine.stages.documents.pdf import open_pdf, page_geometry
from ps3_engine.stages.documents.text_regions import (
    PageGeometry,
    Word,
    assign_blocks,
    points_to_pixels,
    rendered_size,
    sentence_regions,
    union_box,
    word_run_regions,
)
from ps3_engine.stages.geometry import is_inside
from tests.support.pdfs import rotated_pdf, text_pdf


def words_of(texts: list[str], per_line: int = 5, block_every: int | None = None) -> list[Word]:
    """Words laid out left to right, ``per_line`` a line, 20 px tall lines 30 px apart."""
    words = []
    for i, text in enumerate(texts):
        line = i // per_line
        x = 10 + (i % per_line) * 60
        block = line // block_every if block_every else 0
        words.append(Word(text, x, 30 * line, x + 50, 30 * line + 20, line, block))
    return words


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_points_to_pixels_matches_pdfium_page_to_device(rotation):
    generated = text_pdf(1, paragraphs=1, lines_per_paragraph=1)
    document = open_pdf(rotated_pdf(generated.data, rotation))
    page = document[0]
    geometry = page_geometry(page, 150)
    expected_size = (1650, 1275) if rotation in (90, 270) else (1275, 1650)
    assert (geometry.width, geometry.height) == expected_size
    points = [(0.0, 0.0), (612.0, 0.0), (0.0, 792.0), (72.0, 700.0), (300.5, 123.25)]
    dx, dy = ctypes.c_int(), ctypes.c_int()
    for x, y in points:
        pdfium_c.FPDF_PageToDevice(page, 0, 0, geometry.width, geometry.height, 0, x, y, dx, dy)
        mapped = points_to_pixels(np.array([[x, y, x, y]]), geometry)[0]
        assert abs(mapped[0] - dx.value) <= 1 and abs(mapped[1] - dy.value) <= 1, (rotation, x, y)
    document.close()


@given(
    dpi=st.sampled_from([72, 100, 150, 300]),
    rotation=st.sampled_from([0, 90, 180, 270]),
    box=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_boxes_inside_the_page_map_inside_the_bitmap(dpi, rotation, box):
    page_box = (10.0, 20.0, 622.0, 812.0)
    width, height = rendered_size(page_box, rotation, dpi)
    geometry = PageGeometry(page_box, rotation, width, height)
    fx0, fx1 = sorted(box[::2])
    fy0, fy1 = sorted(box[1::2])
    ltrb = np.array([[10 + 612 * fx0, 20 + 792 * fy0, 10 + 612 * fx1, 20 + 792 * fy1]])
    x0, y0, x1, y1 = points_to_pixels(ltrb, geometry)[0]
    assert -1e-6 <= x0 <= x1 <= width + 1e-6 and -1e-6 <= y0 <= y1 <= height + 1e-6
    area_px = (x1 - x0) * (y1 - y0)
    assert area_px == pytest.approx(612 * 792 * (fx1 - fx0) * (fy1 - fy0) * (width * height) / (612 * 792), abs=1e-3)


def test_rendered_size_rounds_points_times_dpi():
    assert rendered_size((0, 0, 612, 792), 0, 150) == (1275, 1650)
    assert rendered_size((0, 0, 595.28, 841.89), 0, 150) == (1240, 1754)  # A4
    assert rendered_size((0, 0, 612, 792), 90, 150) == (1650, 1275)


def test_union_box_rounds_outward_and_clips():
    words = [Word("a", 10.4, 5.6, 20.2, 15.1, 0, 0), Word("b", 30.0, 4.9, 1000.0, 14.0, 0, 0)]
    box = union_box(words, width=500, height=100)
    assert tuple(box) == (10, 4, 500, 16)
    assert is_inside(box, 500, 100)
    assert union_box([Word("c", 600, 5, 700, 9, 0, 0)], 500, 100) is None


def test_sentences_split_at_punctuation_blocks_and_max_words():
    texts = ["One", "two.", "Three", "four", "five!", "Six", "seven", "eight", "nine", "ten"]
    regions = sentence_regions(words_of(texts, per_line=4), 1000, 1000, max_words=64)
    assert [r.text for r in regions] == ["One two.", "Three four five!", "Six seven eight nine ten"]
    assert [r.first_word for r in regions] == [0, 2, 5]
    # "Three four five!" spans the end of line 0 and the start of line 1: its box covers both lines.
    assert regions[1].box.y0 == 0 and regions[1].box.y1 == 50
    blocked = sentence_regions(words_of(texts, per_line=3, block_every=1), 1000, 1000)
    assert [r.text for r in blocked] == ["One two.", "Three", "four five!", "Six", "seven eight nine", "ten"]
    capped = sentence_regions(words_of(texts[5:]), 1000, 1000, max_words=2)
    assert [r.num_words for r in capped] == [2, 2, 1]


def test_sentence_end_allows_closing_quotes_and_brackets():
    regions = sentence_regions(words_of(["He", 'said "stop."', "Then", "(left.)", "end"]), 1000, 1000)
    assert [r.text for r in regions] == ['He said "stop."', "Then (left.)", "end"]


def test_word_runs_are_consecutive_within_blocks():
    texts = [f"w{i}" for i in range(40)]
    runs = word_run_regions(words_of(texts), 2000, 2000, run_length=15, stride=15, min_words=5)
    assert [r.num_words for r in runs] == [15, 15, 10]
    assert runs[0].text == " ".join(texts[:15]) and runs[2].text == " ".join(texts[30:])
    # 15 words span three lines of 5: the union box covers all three.
    assert (runs[0].box.y0, runs[0].box.y1) == (0, 80)
    short_tail = word_run_regions(words_of(texts[:18]), 2000, 2000, min_words=5)
    assert [r.num_words for r in short_tail] == [15]
    # Blocks of 10 words (two lines of 5): runs never cross them.
    blocked = word_run_regions(words_of(texts, block_every=2), 2000, 2000, run_length=15, min_words=5)
    assert [(r.first_word, r.num_words) for r in blocked] == [(0, 10), (10, 10), (20, 10), (30, 10)]
    overlapping = word_run_regions(words_of(texts[:20]), 2000, 2000, run_length=15, stride=5)
    assert [(r.first_word, r.num_words) for r in overlapping] == [(0, 15), (5, 15)]


def test_assign_blocks_from_line_gaps_and_upward_jumps():
    words = [
        Word("a", 0, 0, 10, 20, 0, 0),
        Word("b", 0, 25, 10, 45, 1, 0),  # gap 5 < 0.8 * 20: same block
        Word("c", 0, 80, 10, 100, 2, 0),  # gap 35: new block
        Word("d", 300, 0, 310, 20, 3, 0),  # back up the page: a new column
    ]
    assert [w.block for w in assign_blocks(words)] == [0, 0, 1, 2]


def test_words_from_tesseract_data_keeps_confident_words_in_order():
    data = {
        "level": [1, 2, 5, 5, 5, 5, 5],
        "block_num": [0, 1, 1, 1, 1, 2, 2],
        "par_num": [0, 1, 1, 1, 2, 1, 1],
        "line_num": [0, 1, 1, 1, 1, 1, 1],
        "left": [0, 0, 10, 70, 10, 10, 80],
        "top": [0, 0, 5, 5, 40, 90, 90],
        "width": [0, 0, 50, 40, 30, 60, 0],
        "height": [0, 0, 20, 20, 20, 20, 20],
        "conf": [-1, -1, 96.0, 12.0, 91.0, 88.5, 90.0],
        "text": ["", "", "Hello", "noise", "world.", "Next", "empty-box"],
    }
    words = words_from_tesseract_data(data, min_confidence=30)
    assert [(w.text, w.line, w.block) for w in words] == [("Hello", 0, 0), ("world.", 1, 0), ("Next", 2, 1)]
    assert (words[0].x0, words[0].y0, words[0].x1, words[0].y1) == (10, 5, 60, 25)

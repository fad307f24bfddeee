"""Properties of the PS3 box geometry, scoring and selection (pure functions, hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps3_engine.stages.box_selection import box_scores, candidate_boxes, select_top_boxes
from ps3_engine.stages.geometry import BoxXYXY, boxes_overlap, intersection_area, iou, is_inside, scale_box
from ps3_engine.stages.segmenters.masks import MaskSet

sizes = st.integers(min_value=64, max_value=5000)
fractions = st.sampled_from([0.1, 0.15, 0.2, 0.25, 0.5, 1.0])


@given(width=sizes, height=sizes, fraction=fractions, stride=st.sampled_from([1.0, 0.5]))
def test_candidates_lie_inside_the_image(width, height, fraction, stride):
    boxes = candidate_boxes(width, height, fraction, (1.5,), stride)
    assert boxes
    assert all(is_inside(box, width, height) for box in boxes)


@given(width=sizes, height=sizes, fraction=fractions)
def test_paper_grid_squares_touch_without_overlap_and_variants_keep_the_area(width, height, fraction):
    boxes = candidate_boxes(width, height, fraction, (1.5,))
    side = max(1, round(min(width, height) * fraction))
    squares = [b for b in boxes if b.width == b.height == side]
    assert len(squares) == (width // side) * (height // side)
    for i, a in enumerate(squares):
        assert not any(boxes_overlap(a, b) for b in squares[i + 1 :])
    for box in boxes:
        if box.width != box.height:
            assert abs(box.area - side * side) <= 2 * side + 2  # same area up to rounding
            ratio = max(box.width, box.height) / min(box.width, box.height)
            if min(box.width, box.height) >= 20:
                assert ratio == pytest.approx(1.5, rel=0.1)


def test_paper_example_two_k_image():
    boxes = candidate_boxes(2048, 1536, 0.2)
    squares = [b for b in boxes if b.width == b.height]
    assert {b.width for b in squares} == {307}
    assert len(squares) == 6 * 5 and len(boxes) == 3 * 30


random_masks = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 40), st.integers(1, 40)), min_size=0, max_size=8
)


def mask_stack(specs, width=100, height=100) -> np.ndarray:
    stack = np.zeros((len(specs), height, width), dtype=bool)
    for i, (x, y, w, h) in enumerate(specs):
        stack[i, y : y + h, x : x + w] = True
    return stack


@given(
    specs=random_masks, extra=st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 10), st.integers(1, 10))
)
def test_score_never_decreases_when_a_mask_is_added(specs, extra):
    boxes = candidate_boxes(100, 100, 0.25)
    before = MaskSet(100, 100, stack=mask_stack(specs))
    after = MaskSet(100, 100, stack=mask_stack([*specs, extra]))
    score_before = box_scores(before.areas(), before.inside_areas(boxes), 100 * 100, floor=4)
    score_after = box_scores(after.areas(), after.inside_areas(boxes), 100 * 100, floor=4)
    assert np.all(score_after >= score_before - 1e-9)
    touched = [
        i
        for i, b in enumerate(boxes)
        if intersection_area(b, BoxXYXY(extra[0], extra[1], extra[0] + extra[2], extra[1] + extra[3])) > 0
    ]
    assert all(score_after[i] > score_before[i] for i in touched)


@given(count=st.integers(1, 6))
def test_more_small_masks_in_a_box_score_higher(count):
    boxes = [BoxXYXY(0, 0, 50, 50)]
    specs = [(2 + 7 * i, 2, 5, 5) for i in range(count)]
    fewer = MaskSet(100, 100, stack=mask_stack(specs[:-1]))
    more = MaskSet(100, 100, stack=mask_stack(specs))
    assert (
        box_scores(more.areas(), more.inside_areas(boxes), 1e4, 16)[0]
        > box_scores(fewer.areas(), fewer.inside_areas(boxes), 1e4, 16)[0]
    )


def test_score_matches_the_paper_formula_by_hand():
    # One 10x10 mask fully inside, one 40x40 mask half inside; image 200x200; floor 20x20.
    areas = np.array([100.0, 1600.0])
    inside = np.array([[100.0, 800.0]])
    expected = 40000 / max(100, 400) * 1.0 + 40000 / 1600 * 0.5
    assert box_scores(areas, inside, 40000, floor=400)[0] == pytest.approx(expected)


@given(specs=random_masks.filter(lambda s: len(s) > 0), factor=st.sampled_from([2, 3]))
@settings(max_examples=40, deadline=None)
def test_selection_is_invariant_to_uniform_scaling(specs, factor):
    """Scaling image, masks and boxes by an integer factor scales the selected boxes (floor scaled too)."""
    base = MaskSet(100, 100, stack=mask_stack(specs))
    big = MaskSet(
        100 * factor, 100 * factor, stack=np.repeat(np.repeat(mask_stack(specs), factor, axis=1), factor, axis=2)
    )
    # Squares only: same-area variants round differently at different sizes, squares scale exactly.
    boxes_small = candidate_boxes(100, 100, 0.2, aspect_ratios=())
    boxes_big = candidate_boxes(100 * factor, 100 * factor, 0.2, aspect_ratios=())
    assert [tuple(v * factor for v in b) for b in boxes_small] == [tuple(b) for b in boxes_big]
    scores_small = box_scores(base.areas(), base.inside_areas(boxes_small), 1e4, floor=16)
    scores_big = box_scores(big.areas(), big.inside_areas(boxes_big), 1e4 * factor**2, floor=16 * factor**2)
    np.testing.assert_allclose(scores_small, scores_big, rtol=1e-9)
    assert select_top_boxes(boxes_small, scores_small, 4) == select_top_boxes(boxes_big, scores_big, 4)


def test_working_resolution_does_not_change_full_resolution_areas():
    """Masks computed on a 2x downscaled copy report the same full-resolution areas and overlaps."""
    full = mask_stack([(10, 10, 20, 30), (50, 50, 40, 40)], 100, 100)
    half = full[:, ::2, ::2]
    boxes = [BoxXYXY(0, 0, 40, 40), BoxXYXY(40, 40, 100, 100)]
    at_full, at_half = MaskSet(100, 100, stack=full), MaskSet(100, 100, stack=half)
    np.testing.assert_allclose(at_full.areas(), at_half.areas())
    np.testing.assert_allclose(at_full.inside_areas(boxes), at_half.inside_areas(boxes))


def test_labels_and_stack_representations_agree():
    labels = np.zeros((60, 80), dtype=np.int32)
    labels[10:30, 10:50] = 1
    labels[40:55, 60:75] = 2
    stack = np.stack([labels == i for i in range(3)])
    boxes = candidate_boxes(160, 120, 0.25)
    from_labels, from_stack = MaskSet(160, 120, labels=labels), MaskSet(160, 120, stack=stack)
    np.testing.assert_allclose(from_labels.areas(), from_stack.areas())
    np.testing.assert_allclose(from_labels.inside_areas(boxes), from_stack.inside_areas(boxes))


@given(scores=st.lists(st.floats(0, 100, allow_nan=False), min_size=90, max_size=90), k=st.integers(1, 6))
def test_selection_is_topk_non_overlapping_and_positive(scores, k):
    boxes = candidate_boxes(2048, 1536, 0.2)
    chosen = select_top_boxes(boxes, np.array(scores), k)
    assert len(chosen) <= k and len(set(chosen)) == len(chosen)
    assert all(scores[i] > 0 for i in chosen)
    assert [scores[i] for i in chosen] == sorted((scores[i] for i in chosen), reverse=True)
    for i, a in enumerate(chosen):
        assert not any(boxes_overlap(boxes[a], boxes[b]) for b in chosen[i + 1 :])
    # Greedy: any positive box not chosen overlaps a chosen box with a score at least as high (or k is full).
    if len(chosen) < k:
        for index, score in enumerate(scores):
            if score > 0 and index not in chosen:
                assert any(boxes_overlap(boxes[index], boxes[c]) and scores[c] >= score for c in chosen)


def test_no_masks_selects_nothing():
    boxes = candidate_boxes(100, 100, 0.5)
    assert select_top_boxes(boxes, box_scores(np.zeros(0), np.zeros((len(boxes), 0)), 1e4), 4) == []


@given(
    box=st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(1, 50), st.integers(1, 50)),
    scale=st.floats(0.1, 4),
)
def test_scale_box_stays_inside_and_covers(box, scale):
    b = BoxXYXY(box[0], box[1], box[0] + box[2], box[1] + box[3])
    out = scale_box(b, scale, scale, round(100 * scale) + 1, round(100 * scale) + 1)
    assert is_inside(out, round(100 * scale) + 1, round(100 * scale) + 1)
    assert out.x0 <= b.x0 * scale + 1e-9 and out.y0 <= b.y0 * scale + 1e-9


def test_iou_basics():
    a = BoxXYXY(0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert iou(a, BoxXYXY(10, 0, 20, 10)) == 0.0
    assert iou(a, BoxXYXY(5, 0, 15, 10)) == pytest.approx(50 / 150)

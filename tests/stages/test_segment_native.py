"""SAM2 at native resolution: compact masks give the box rule the same answer as dense ones, crops are cut
from the original pixels, and a prompt batch's masks fit the memory budget (issue 16 item 6)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from sam2.utils.amg import mask_to_rle_pytorch
from skimage.measure import label

from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.schemas import IMAGE_SCHEMA
from ps3_engine.stages.base import ShardContext
from ps3_engine.stages.box_selection import candidate_boxes
from ps3_engine.stages.segment import SegmentConfig, SegmentStage, select_regions
from ps3_engine.stages.segmenters.masks import ColumnRuns, MaskSet
from ps3_engine.stages.segmenters.sam2 import Sam2Segmenter, Sam2Settings, prompts_per_batch
from tests.stages.test_segment import image_row

TINY_SAM2 = {
    "model_cfg": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "allow_random_weights": True,
    "image_size": 256,
    "points_per_side": 4,
    "crop_n_layers": 1,  # the paper's setting: the point of this file
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "device": "cpu",
}


def to_runs(stack: np.ndarray) -> ColumnRuns:
    """Dense ``(N, h, w)`` bool -> runs, through SAM2's own encoder (the one its AMG uses)."""
    return ColumnRuns.from_rles(mask_to_rle_pytorch(torch.from_numpy(stack)), *stack.shape[1:])


def test_column_runs_match_dense_masks_exactly():
    rng = np.random.default_rng(0)
    h, w = 97, 131
    stack = rng.random((7, h, w)) > 0.6
    stack[0] = False  # empty
    stack[1] = True  # whole image: one run across every column
    stack[2] = False
    stack[2, 0, 0] = stack[2, -1, -1] = True  # first and last pixel
    runs = to_runs(stack)
    assert runs.num_masks == 7
    for full_w, full_h in ((w, h), (400, 300), (1000, 333)):  # native grid, and a grid scaled to full res
        dense, compact = MaskSet(full_w, full_h, stack=stack), MaskSet(full_w, full_h, runs=runs)
        boxes = candidate_boxes(full_w, full_h, 0.2, (1.5,), 0.5)
        np.testing.assert_array_equal(dense.areas(), compact.areas())
        np.testing.assert_array_equal(dense.inside_areas(boxes), compact.inside_areas(boxes))
    empty = ColumnRuns.from_rles([], h, w)
    assert MaskSet(w, h, runs=empty).inside_areas(candidate_boxes(w, h)).shape == (len(candidate_boxes(w, h)), 0)
    with pytest.raises(ValueError, match="expected"):
        ColumnRuns.from_rles([{"size": [h, w], "counts": [5, 3]}], h, w)


def planted_masks(width: int, height: int, seed: int) -> tuple[np.ndarray, list[tuple]]:
    """Dense full-resolution masks of a planted scene: connected regions of its quantised colours (the
    ellipses, the tiny text and dots, background bands) plus the planted patches themselves."""
    image, planted = planted_scene(width, height, seed, num_patches=3)
    pixels = np.asarray(image) // 64
    regions = label(pixels[..., 0] * 16 + pixels[..., 1] * 4 + pixels[..., 2], connectivity=1, background=-1)
    sizes = np.bincount(regions.ravel())
    ids = [i for i in np.argsort(sizes)[::-1] if sizes[i] >= 20][:40]
    stack = [regions == i for i in ids]
    for x0, y0, x1, y1 in planted:
        patch = np.zeros((height, width), dtype=bool)
        patch[y0:y1, x0:x1] = True
        stack.append(patch)
    return np.stack(stack), planted


def test_box_rule_is_the_same_with_dense_and_compact_masks_on_a_planted_scene():
    width, height = 1536, 1024
    stack, planted = planted_masks(width, height, seed=3)
    assert stack.shape[0] > 10
    dense, compact = MaskSet(width, height, stack=stack), MaskSet(width, height, runs=to_runs(stack))
    for config in (SegmentConfig(), SegmentConfig(grid_stride_fraction=0.5, top_k=6)):
        expected = select_regions(dense, width, height, config)
        assert expected and select_regions(compact, width, height, config) == expected
    # The planted detail is found through the compact masks (a patch centre inside a selected box).
    boxes = [box for box, _ in select_regions(compact, width, height, SegmentConfig())]
    centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in planted]
    assert any(b.x0 <= cx < b.x1 and b.y0 <= cy < b.y1 for b in boxes for cx, cy in centres)
    # Compact: the runs of these masks take a small share of the dense stack's bytes.
    assert to_runs(stack).nbytes < stack.nbytes / 20


def test_prompts_per_batch_fits_the_budget():
    image = (2160, 3840)
    # Full frame of a 4K image: 3 masks x (11 + 4) B x 8.3 Mpx = 373 MB per prompt.
    assert prompts_per_batch(image, image, 4096 * 2**20, 128) == 11
    assert prompts_per_batch(image, image, 1, 128) == 1  # never zero: one prompt always runs
    assert prompts_per_batch((100, 100), image, 2**40, 128) == 128  # never above the request
    assert prompts_per_batch((1200, 2100), image, 4096 * 2**20, 128) > 11  # crops are cheaper


@pytest.fixture(scope="module")
def scene_jpeg() -> bytes:
    image, _ = planted_scene(768, 512, seed=5, num_patches=2)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_sam2_crops_come_from_the_native_image_and_the_floor_still_holds(scene_jpeg):
    """The stage hands SAM2 the 768x512 original (not the 256 px working copy): the first crop is the
    whole native frame and the crop_n_layers=1 crops are native pixels (about 470x340 each)."""
    settings = Sam2Settings(**TINY_SAM2)
    stage = SegmentStage(SegmentConfig(backend="sam2", mask_max_side=256, sam2=settings))
    rows = [image_row("scene", scene_jpeg, size=(768, 512))]
    result = stage.process_batch(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), ShardContext("segment", "s", 1))
    crops = [box for box, _ in stage._segmenter.crops]
    assert crops[0] == (0, 0, 768, 512) and len(crops) == 5
    assert all(x1 - x0 > 384 and y1 - y0 > 256 and x1 <= 768 and y1 <= 512 for x0, y0, x1, y1 in crops[1:])
    assert result.errors.num_rows + len(set(result.output.column("image_id").to_pylist())) == 1
    for row in result.output.to_pylist():
        assert 0 <= row["x0"] < row["x1"] <= 768 and 0 <= row["y0"] < row["y1"] <= 512
        assert row["score"] > 0 and '"max_side": null' in row["backend_settings_json"]
        assert "mask_batch_mb" not in row["backend_settings_json"]  # operational: no rerun when it changes
    # sam2.max_side caps what SAM2 sees (the working copy and the boxes stay as they were).
    capped_settings = settings.model_copy(update={"max_side": 384, "crop_n_layers": 0})
    capped = SegmentStage(SegmentConfig(backend="sam2", mask_max_side=256, sam2=capped_settings))
    capped.process_batch(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), ShardContext("segment", "s", 1))
    assert capped._segmenter.crops[0][0] == (0, 0, 384, 256)


@pytest.mark.slow  # two SAM2 runs of 5 crops each: about a minute of CPU
def test_prompt_budget_bounds_batches_without_changing_the_masks(scene_jpeg):
    """A tight budget runs one prompt per batch; per-crop NMS runs after all batches, so the masks are the same."""
    from ps3_engine.stages.imaging import load_rgb

    image = np.asarray(load_rgb(scene_jpeg))
    segmenter = Sam2Segmenter(Sam2Settings(**TINY_SAM2))
    loose_masks, loose_crops = segmenter.masks(image, 768, 512), segmenter.crops
    segmenter._generator.mask_batch_bytes = 16 * 2**20  # as Sam2Settings(mask_batch_mb=16), one model build
    tight_masks, tight_crops = segmenter.masks(image, 768, 512), segmenter.crops
    # 16 prompts per crop: one batch each with the default budget, several with 16 MiB (19 MB per prompt
    # on the full frame, about 8 MB on a crop).
    assert min(ppb for _, ppb in loose_crops) >= 16 and max(ppb for _, ppb in tight_crops) < 4
    assert loose_masks.num_masks == tight_masks.num_masks > 0
    np.testing.assert_array_equal(loose_masks.areas(), tight_masks.areas())
    boxes = candidate_boxes(768, 512)
    np.testing.assert_array_equal(loose_masks.inside_areas(boxes), tight_masks.inside_areas(boxes))

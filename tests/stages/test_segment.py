"""The segment stage on local Ray: classical and random-weight SAM2 backends, errors, reruns, OOM splits."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl, run_segment
from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.schemas import IMAGE_SCHEMA
from ps3_engine.stages.base import ShardContext
from ps3_engine.stages.box_selection import DEFAULT_MIN_EDGE_DENSITY, box_edge_density, candidate_boxes, edge_pixels
from ps3_engine.stages.geometry import BoxXYXY, boxes_overlap, is_inside
from ps3_engine.stages.imaging import load_rgb
from ps3_engine.stages.segment import SegmentConfig, SegmentStage, region_id_for
from ps3_engine.stages.segmenters.masks import MaskSet
from ps3_engine.stages.segmenters.sam2 import Sam2Settings, check_checkpoint_source, resolve_checkpoint

SAM2_TINY = [
    "segment.backend=sam2",
    "segment.mask_max_side=256",
    "segment.sam2.model_cfg=configs/sam2.1/sam2.1_hiera_t.yaml",
    "segment.sam2.allow_random_weights=true",
    "segment.sam2.image_size=256",
    "segment.sam2.points_per_side=4",
    "segment.sam2.max_side=512",  # native 2048x1536 costs minutes of shared CPU; native runs: test_segment_native
    "segment.sam2.crop_n_layers=0",
    "segment.sam2.pred_iou_thresh=0.0",
    "segment.sam2.stability_score_thresh=0.0",
    "segment.sam2.device=cpu",
]


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    planted = {}
    for seed in range(3):
        image, boxes = planted_scene(2048, 1536, seed, num_patches=2)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (folder / f"scene-{seed}.jpg").write_bytes(buffer.getvalue())
        planted[f"scene-{seed}.jpg"] = boxes
    (folder / "copy-of-scene-0.jpg").write_bytes((folder / "scene-0.jpg").read_bytes())
    return folder, planted


def crawled_run(folder: Path, run_root: Path, *overrides: str):
    config = load_run_config(
        None,
        ["executor.progress=false", "crawl.shard_size=2", "executor.kind=local", *overrides],
        run_root=str(run_root),
        sources=[str(folder)],
    )
    assert run_crawl(config).kept_rows == 3
    return config


def regions_by_image(layout: RunLayout) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for shard in layout.manifests("segment"):
        for row in layout.read_output("segment", shard).to_pylist():
            found.setdefault(row["image_id"], []).append(row)
    return found


def test_classical_backend_on_ray_finds_planted_detail(planted_folder, tmp_path, ray_local):
    folder, planted = planted_folder
    config = crawled_run(folder, tmp_path / "run")
    config = config.model_copy(update={"executor": config.executor.model_copy(update={"kind": "ray"})})
    result = run_segment(config)
    assert result.failed_shards == [] and result.computed_shards == 2
    assert result.input_rows == 3  # the exact duplicate dropped by the crawl dedup is not segmented
    layout = RunLayout(Storage(config.run_root))
    images = {r["image_id"]: r for s in layout.manifests("crawl") for r in layout.read_output("crawl", s).to_pylist()}
    regions = regions_by_image(layout)
    assert len(regions) == 3
    hits = 0
    for image_id, rows in regions.items():
        image = images[image_id]
        boxes = [BoxXYXY(r["x0"], r["y0"], r["x1"], r["y1"]) for r in sorted(rows, key=lambda r: r["rank"])]
        assert 1 <= len(boxes) <= 4
        assert all(is_inside(b, image["width"], image["height"]) for b in boxes)
        assert not any(boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
        assert [r["region_id"] for r in sorted(rows, key=lambda r: r["rank"])] == [
            region_id_for(image_id, b) for b in boxes
        ]
        scores = [r["score"] for r in sorted(rows, key=lambda r: r["rank"])]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
        assert {r["backend"] for r in rows} == {"classical"}
        for patch in planted[Path(image["source_ref"]).name]:
            cx, cy = (patch[0] + patch[2]) / 2, (patch[1] + patch[3]) / 2
            hits += any(b.x0 <= cx < b.x1 and b.y0 <= cy < b.y1 for b in boxes)
    assert hits >= 4, f"only {hits} of 6 planted detail patches fell inside a selected box"
    settings = json.loads(rows[0]["backend_settings_json"])
    assert settings["selection"]["top_k"] == 4 and settings["backend"]["scale"] == 300.0

    again = run_segment(config)
    assert again.computed_shards == 0 and again.skipped_shards == 2
    fewer = run_segment(config.model_copy(update={"segment": config.segment.model_copy(update={"top_k": 2})}))
    assert fewer.computed_shards == 2
    assert max(len(rows) for rows in regions_by_image(layout).values()) <= 2


def test_sam2_random_weights_in_an_actor_pool(planted_folder, tmp_path, ray_local):
    folder, _ = planted_folder
    config = crawled_run(folder, tmp_path / "run", *SAM2_TINY)
    config = config.model_copy(update={"executor": config.executor.model_copy(update={"kind": "ray"})})
    result = run_segment(config)
    assert result.failed_shards == []
    layout = RunLayout(Storage(config.run_root))
    regions = regions_by_image(layout)
    errors = layout.read_errors("segment").to_pylist()
    # Every image that entered leaves as regions or as an error row, never both, never neither.
    assert len(regions) + len({e["item_id"] for e in errors}) == 3
    assert not set(regions) & {e["item_id"] for e in errors}
    for rows in regions.values():
        assert {r["backend"] for r in rows} == {"sam2"}
        assert json.loads(rows[0]["backend_settings_json"])["backend"]["points_per_side"] == 4


def test_missing_sam2_weights_fail_before_any_worker_starts(planted_folder, tmp_path):
    folder, _ = planted_folder
    config = crawled_run(folder, tmp_path / "run", "segment.backend=sam2")
    with pytest.raises(ValueError, match="no SAM2 checkpoint"):
        run_segment(config)
    with pytest.raises(ValueError, match="does not exist"):
        check_checkpoint_source(Sam2Settings(checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="hf://<owner>/<repo>/<file>"):
        check_checkpoint_source(Sam2Settings(checkpoint="hf://justafile.pt"))


def test_s3_checkpoint_is_cached_locally(s3_bucket, s3_server, tmp_path):
    s3_server.client().put_object(Bucket=s3_bucket, Key="weights/sam2.pt", Body=b"fake weights")
    settings = Sam2Settings(checkpoint=f"s3://{s3_bucket}/weights/sam2.pt", weights_cache_dir=str(tmp_path))
    local = resolve_checkpoint(settings)
    assert Path(local).read_bytes() == b"fake weights"
    mtime = Path(local).stat().st_mtime_ns
    s3_server.client().delete_object(Bucket=s3_bucket, Key="weights/sam2.pt")
    assert resolve_checkpoint(settings) == local and Path(local).stat().st_mtime_ns == mtime


def image_row(image_id: str, data: bytes | None, ref: str | None = None, size=(2048, 1536)) -> dict:
    return {
        "image_id": image_id,
        "item_id": image_id,
        "shard_id": "s",
        "source_ref": f"src-{image_id}",
        "source_kind": "file",
        "source_list": "l",
        "final_url": None,
        "image_bytes": data,
        "image_ref": ref,
        "num_bytes": len(data or b""),
        "width": size[0],
        "height": size[1],
        "format": "JPEG",
        "mode": "RGB",
        "exif_orientation": 1,
        "sha256": image_id,
        "phash": 0,
        "content_type": None,
        "http_status": None,
        "license": None,
        "attribution": None,
        "metadata_json": "{}",
        "fetch_attempts": 1,
        "fetched_at": datetime.now(UTC),
    }


def jpeg(seed: int, size=(512, 384)) -> bytes:
    image, _ = planted_scene(size[0], size[1], seed, 1)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def test_bad_rows_become_error_rows():
    stage = SegmentStage(SegmentConfig(mask_max_side=256))
    batch = pa.Table.from_pylist(
        [
            image_row("good", jpeg(1), size=(512, 384)),
            image_row("garbage", b"\xff\xd8 not really a jpeg"),
            image_row("http-ref", None, ref="http://example.com/a.jpg"),
        ],
        schema=IMAGE_SCHEMA,
    )
    result = stage.process_batch(batch, ShardContext("segment", "s", 1))
    reasons = {r["item_id"]: r["reason"] for r in result.errors.to_pylist()}
    assert reasons == {"garbage": "undecodable", "http-ref": "undecodable"}
    assert "image_storage=bytes" in result.errors.to_pylist()[1]["message"]
    assert set(result.output.column("image_id").to_pylist()) == {"good"}


class BatchLimitedSegmenter:
    """Stands in for a GPU backend that runs out of memory on batches larger than one image."""

    def __init__(self, oom_ids: set[int] | None = None) -> None:
        self.calls: list[int] = []
        self.oom_ids = oom_ids or set()

    def masks_batch(self, images):
        self.calls.append(len(images))
        if len(images) > 1 or id(images[0][0]) in self.oom_ids:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        image, width, height = images[0]
        labels = np.zeros(image.shape[:2], dtype=np.int32)
        labels[: image.shape[0] // 4, : image.shape[1] // 4] = 1
        return [MaskSet(full_width=width, full_height=height, labels=labels)]


def test_out_of_memory_batches_are_split_and_retried():
    stage = SegmentStage(SegmentConfig(mask_max_side=128, max_batch_pixels=10**9))
    fake = BatchLimitedSegmenter()
    stage._segmenter = fake
    rows = [image_row(f"img{i}", jpeg(i, (256, 192)), size=(256, 192)) for i in range(4)]
    result = stage.process_batch(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), ShardContext("segment", "s", 1))
    assert result.errors.num_rows == 0
    assert set(result.output.column("image_id").to_pylist()) == {f"img{i}" for i in range(4)}
    assert fake.calls[0] == 4 and fake.calls.count(1) == 4


def test_pixel_budget_groups_images():
    from ps3_engine.stages.segment import pixel_batches

    assert pixel_batches([5, 5, 5, 20, 1], budget=10) == [[0, 1], [2], [3], [4]]
    assert pixel_batches([], budget=10) == []


@pytest.mark.gpu
def test_real_sam2_on_gpu(planted_folder, tmp_path):
    import torch

    checkpoint = os.environ.get("PS3_SAM2_CHECKPOINT")
    if not torch.cuda.is_available() or not checkpoint:
        pytest.skip("needs a CUDA GPU and PS3_SAM2_CHECKPOINT (sam2.1_hiera_large.pt)")
    folder, _ = planted_folder
    config = crawled_run(folder, tmp_path / "run", "segment.backend=sam2", f"segment.sam2.checkpoint={checkpoint}")
    result = run_segment(config)
    assert result.failed_shards == [] and result.output_rows >= 3


# -- the detail floor: blank images have no salient region, in both backends ------------------------


def jpeg_of(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def blank_and_near_blank() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    width, height = 2048, 1536
    ramp = np.linspace(60, 230, width)[None, :, None].repeat(height, 0).repeat(3, 2)
    return {
        "white": Image.new("RGB", (width, height), "white"),  # the instance: 4 regions, score 0.03
        "black": Image.new("RGB", (width, height), "black"),
        "grey-noise-2": Image.fromarray(np.clip(128 + rng.normal(0, 2, (height, width, 3)), 0, 255).astype("u1")),
        "grey-noise-8": Image.fromarray(np.clip(128 + rng.normal(0, 8, (height, width, 3)), 0, 255).astype("u1")),
        "gradient": Image.fromarray(ramp.astype("u1")),
        "sky": Image.fromarray(np.linspace(100, 200, height)[:, None, None].repeat(width, 1).repeat(3, 2).astype("u1")),
    }


def word_on_white() -> tuple[Image.Image, tuple[int, int]]:
    image = Image.new("RGB", (2048, 1536), "white")
    ImageDraw.Draw(image).text((1000, 700), "hello world", fill="black")
    return image, (1030, 705)


def test_detail_floor_calibration():
    """The table in ``stages/box_selection.py``: blank and near-blank images have no edge pixels in any
    candidate box; one short word clears the default floor by 3x; planted scenes by 90x."""
    boxes = candidate_boxes(2048, 1536)

    def best_density(image: Image.Image) -> float:
        work = np.asarray(load_rgb(jpeg_of(image), max_side=1024))
        return float(box_edge_density(edge_pixels(work), boxes, 2048, 1536).max())

    for name, image in blank_and_near_blank().items():
        assert best_density(image) == 0.0, name
    assert 3 * DEFAULT_MIN_EDGE_DENSITY < best_density(word_on_white()[0]) < 0.01
    for seed in range(3):
        assert best_density(planted_scene(2048, 1536, seed)[0]) > 90 * DEFAULT_MIN_EDGE_DENSITY


def test_blank_and_near_blank_images_are_filtered_with_the_classical_backend():
    stage = SegmentStage(SegmentConfig())
    images = {name: image for name, image in blank_and_near_blank().items() if name in ("white", "gradient")}
    word, (word_x, word_y) = word_on_white()
    rows = [image_row(name, jpeg_of(image)) for name, image in images.items()] + [image_row("word", jpeg_of(word))]
    result = stage.process_batch(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), ShardContext("segment", "s", 1))
    errors = {e["item_id"]: e for e in result.errors.to_pylist()}
    assert set(errors) == set(images)
    assert {(e["category"], e["reason"]) for e in errors.values()} == {("filtered", "no_salient_region")}
    assert "edge density" in errors["white"]["message"]
    (box,) = result.output.to_pylist()  # only the box holding the word has detail
    assert box["image_id"] == "word" and box["x0"] <= word_x < box["x1"] and box["y0"] <= word_y < box["y1"]
    # The floor is a setting: 0 turns it off and the blank image gets its 0.03-score boxes back.
    stage.config = stage.config.model_copy(update={"min_edge_density": 0.0})
    unfloored = stage.process_batch(pa.Table.from_pylist(rows[:1], schema=IMAGE_SCHEMA), ShardContext("s", "s", 1))
    assert [round(r["score"], 2) for r in unfloored.output.to_pylist()] == [0.03] * 4


def test_blank_image_is_filtered_with_the_sam2_backend():
    """Random-weight SAM2 proposes masks even on a white page; the floor, computed from the image, holds."""
    settings = Sam2Settings(
        model_cfg="configs/sam2.1/sam2.1_hiera_t.yaml",
        allow_random_weights=True,
        image_size=256,
        points_per_side=4,
        max_side=512,
        crop_n_layers=0,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        device="cpu",
    )
    rows = pa.Table.from_pylist([image_row("white", jpeg_of(blank_and_near_blank()["white"]))], schema=IMAGE_SCHEMA)
    stage = SegmentStage(SegmentConfig(backend="sam2", mask_max_side=256, sam2=settings))
    result = stage.process_batch(rows, ShardContext("segment", "s", 1))
    assert [(e["item_id"], e["reason"]) for e in result.errors.to_pylist()] == [("white", "no_salient_region")]
    assert result.output.num_rows == 0
    # Without the floor the same masks give the white page boxes: the floor, not the backend, decides.
    stage.config = stage.config.model_copy(update={"min_edge_density": 0.0})
    assert stage.process_batch(rows, ShardContext("segment", "s", 1)).output.num_rows > 0

"""PS3 training data: sample transform (boxes under crops, EXIF, caption choice), balancing, Ray read, check.

A small synthetic corpus is packed with the corpus builder's own shard writer and manifest, so the
loader reads exactly what ``build-corpus`` writes: plain-coloured images with one solid rectangle at a
known box, one of them stored rotated with EXIF orientation 6.
"""

from __future__ import annotations

import io
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.corpus import MANIFEST_KEY, OutputShard, RowSlice, _manifest, write_output_shard
from ps3_engine.schemas.corpus import CORPUS_SCHEMA
from ps3_engine.stages.corpus import CorpusConfig
from ps3_engine.stages.geometry import BoxXYXY
from ps3_engine.training.ps3.data import (
    CorpusSampleTransform,
    box_xyxy_in_output,
    check_corpus,
    choose_caption,
    decode_oriented,
    iter_samples,
    mask_sentences,
    random_resized_crop_xywh,
    rasterise_box_xyxy,
    read_corpus,
    sample_rng,
    source_balanced_weights,
    split_sentences,
    training_dataset,
)
from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer

SIZE = 64
CONTEXT = 16
GREY, RED, BLUE = (128, 128, 128), (220, 30, 30), (30, 40, 220)


@dataclass(frozen=True)
class Scene:
    image_id: str
    source: str
    split: str
    size: tuple[int, int]  # displayed (EXIF-oriented) width, height
    box: BoxXYXY
    colour: tuple[int, int, int]
    local: bool = True
    global_caption: str | None = "A grey scene with one coloured box."
    orientation: int = 1


SCENES = [
    Scene("red", "src-a", "train", (160, 120), BoxXYXY(40, 30, 100, 80), RED),
    Scene("rotated", "src-b", "train", (120, 160), BoxXYXY(20, 90, 70, 140), BLUE, orientation=6),
    Scene("global-only", "src-a", "train", (160, 120), BoxXYXY(10, 10, 50, 50), RED, local=False),
    Scene("document", "src-a", "train", (120, 160), BoxXYXY(60, 20, 110, 70), BLUE, global_caption=None),
    Scene("edge", "src-a", "train", (160, 120), BoxXYXY(150, 0, 160, 12), RED),
    Scene("held-out", "src-a", "validation", (160, 120), BoxXYXY(40, 30, 100, 80), RED),
]
LOCAL_CAPTION = "The image is a close-up of a coloured box. It is bright. It has sharp edges. There is no visible text."


def _jpeg(scene: Scene) -> bytes:
    image = Image.new("RGB", scene.size, GREY)
    ImageDraw.Draw(image).rectangle([scene.box.x0, scene.box.y0, scene.box.x1 - 1, scene.box.y1 - 1], fill=scene.colour)
    buffer = io.BytesIO()
    if scene.orientation == 6:  # stored rotated; a viewer (and exif_transpose) rotates it 90 degrees clockwise
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    else:
        image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _row(scene: Scene) -> dict:
    regions = [{"region_id": f"{scene.image_id}-r0", **scene.box._asdict(), "caption": LOCAL_CAPTION}]
    return {
        "image_id": scene.image_id,
        "split": scene.split,
        "source_type": "natural" if scene.global_caption else "document",
        "url": f"file:///{scene.image_id}.jpg",
        "final_url": None,
        "source_list": scene.source,
        "image_bytes": _jpeg(scene),
        "image_ref": None,
        "exif_orientation": scene.orientation,
        "width": scene.size[0],
        "height": scene.size[1],
        "license": None,
        "attribution": None,
        "global_caption": scene.global_caption,
        "regions": regions if scene.local else [],
    }


def write_corpus(root: Path, scenes: list[Scene] = SCENES) -> dict:
    """Pack ``scenes`` with the corpus builder's shard writer and manifest (two train shards, one validation)."""
    storage = Storage(str(root))
    storage.write_parquet_atomic(
        "corpus/part-0.parquet", pa.Table.from_pylist([_row(s) for s in scenes], CORPUS_SCHEMA)
    )
    train = [i for i, s in enumerate(scenes) if s.split == "train"]
    validation = [i for i, s in enumerate(scenes) if s.split == "validation"]
    plan = [
        OutputShard("train", 0, [RowSlice("corpus/part-0.parquet", tuple(train[:3]))]),
        OutputShard("train", 1, [RowSlice("corpus/part-0.parquet", tuple(train[3:]))]),
        OutputShard("validation", 0, [RowSlice("corpus/part-0.parquet", tuple(validation))]),
    ]
    written = [write_output_shard(storage, shard) for shard in plan]
    manifest = _manifest(written, "test", {}, CorpusConfig())
    storage.write_json_atomic(MANIFEST_KEY, manifest)
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return str(build_tiny_text_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _transform(tokenizer_path: str, **overrides) -> CorpusSampleTransform:
    return CorpusSampleTransform(image_size=SIZE, tokenizer_path=tokenizer_path, context_length=CONTEXT, **overrides)


def _rows() -> dict[str, dict]:
    return {s.image_id: _row(s) for s in SCENES}


def _colour_agreement(sample: dict, colour: tuple[int, int, int]) -> tuple[float, float]:
    """(share of GT-map pixels that have ``colour``, share of ``colour`` pixels inside the GT map)."""
    pixels = (sample["pixel_values"].transpose(1, 2, 0) * 0.5 + 0.5) * 255
    coloured = np.abs(pixels - np.asarray(colour)).max(axis=-1) < 60
    inside = sample["gt_map"].astype(bool)
    return coloured[inside].mean(), coloured[inside].sum() / max(coloured.sum(), 1)


# -- transform -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("image_id", "colour"), [("red", RED), ("rotated", BLUE), ("document", BLUE)])
def test_the_gt_map_covers_the_drawn_box_under_random_resized_crops(tokenizer_path, image_id, colour):
    row = _rows()[image_id]
    for epoch in range(12):
        sample = _transform(tokenizer_path, global_caption_prob=0.0, epoch=epoch)(row)
        assert not sample["is_global"]
        precision, recall = _colour_agreement(sample, colour)
        assert precision > 0.8, (epoch, precision)  # edge pixels of the floor/ceil map are blended
        assert recall > 0.99, (epoch, recall)


def test_exif_orientation_is_applied_before_the_boxes(tokenizer_path):
    row = _rows()["rotated"]
    image = decode_oriented(row["image_bytes"])
    assert image.size == (120, 160)
    assert np.abs(np.asarray(image)[115, 45] - np.asarray(BLUE)).max() < 30  # inside the oriented box
    with Image.open(io.BytesIO(row["image_bytes"])) as raw:
        assert raw.size == (160, 120)  # the stored pixels are rotated


def test_a_box_at_the_edge_stays_in_view(tokenizer_path):
    row = _rows()["edge"]
    for epoch in range(20):
        sample = _transform(tokenizer_path, global_caption_prob=0.0, epoch=epoch)(row)
        precision, recall = _colour_agreement(sample, RED)
        assert sample["gt_map"].sum() > 0 and precision > 0, epoch  # what is left of the box is in the map
        assert recall > 0.95, epoch


def test_sample_arrays_have_the_training_shapes_and_types(tokenizer_path):
    sample = _transform(tokenizer_path)(_rows()["red"])
    assert sample["pixel_values"].shape == (3, SIZE, SIZE) and sample["pixel_values"].dtype == np.float32
    assert sample["pixel_values"].min() >= -1.0 and sample["pixel_values"].max() <= 1.0
    assert sample["gt_map"].shape == (SIZE, SIZE) and sample["gt_map"].dtype == np.uint8
    assert sample["input_ids"].shape == (CONTEXT,) and sample["input_ids"].dtype == np.int64
    # always the full context, padded or truncated: the text tower pools the last position, with no mask
    assert "attention_mask" not in sample
    assert (sample["image_id"], sample["source"]) == ("red", "src-a")


def test_the_global_caption_is_used_a_quarter_of_the_time_and_covers_the_image(tokenizer_path):
    row = _rows()["red"]
    draws = [choose_caption(row, sample_rng(0, epoch, "red"), 0.25)[0] is None for epoch in range(4000)]
    assert np.mean(draws) == pytest.approx(0.25, abs=0.025)
    transform = _transform(tokenizer_path)
    samples = [transform.for_epoch(3, epoch)(row) for epoch in range(300)]
    global_share = np.mean([s["is_global"] for s in samples])
    assert global_share == pytest.approx(0.25, abs=0.07)
    assert all(s["gt_map"].all() for s in samples if s["is_global"])
    assert all(not s["gt_map"].all() for s in samples if not s["is_global"])


def test_records_with_one_caption_kind_always_use_it():
    rows = _rows()
    for epoch in range(200):
        assert choose_caption(rows["global-only"], sample_rng(0, epoch, "g"), 0.25)[0] is None
        assert choose_caption(rows["document"], sample_rng(0, epoch, "d"), 0.25)[0] is not None


def test_captions_are_cleaned_before_masking():
    box, caption = choose_caption(_rows()["red"], sample_rng(0, 0, "red"), 0.0)
    assert box == SCENES[0].box
    assert caption == "A coloured box. It is bright. It has sharp edges."


def test_the_same_seed_epoch_and_row_give_the_same_sample(tokenizer_path):
    row = _rows()["red"]
    first, second = _transform(tokenizer_path, seed=5)(row), _transform(tokenizer_path, seed=5)(row)
    np.testing.assert_array_equal(first["pixel_values"], second["pixel_values"])
    other = _transform(tokenizer_path, seed=5, epoch=1)(row)
    assert not np.array_equal(first["pixel_values"], other["pixel_values"])


def test_epoch_none_draws_anew_on_every_call(tokenizer_path):
    transform = _transform(tokenizer_path, epoch=None)
    row = _rows()["red"]
    assert len({transform(row)["pixel_values"].tobytes() for _ in range(5)}) > 1


def test_an_undecodable_row_is_skipped(tokenizer_path):
    row = {**_rows()["red"], "image_bytes": b"not an image"}
    assert _transform(tokenizer_path).samples(row) == []


sentences = st.lists(
    st.text(alphabet="abcdefgh ", min_size=1, max_size=12).map(str.strip).filter(bool), min_size=1, max_size=7
)


@given(sentences, st.integers(0, 2**32 - 1))
def test_sentence_masking_keeps_a_contiguous_non_empty_span(words, seed):
    parts = [f"{w}." for w in words]
    masked = mask_sentences(" ".join(parts), np.random.default_rng(seed))
    kept = split_sentences(masked)
    assert kept
    starts = [i for i in range(min(len(parts) - 1, 2) + 1) if parts[i : i + len(kept)] == kept]
    assert starts, (parts, kept)


@given(
    st.integers(8, 400),
    st.integers(8, 400),
    st.integers(0, 2**32 - 1),
    st.integers(16, 128),
)
def test_crops_lie_inside_the_image_and_boxes_inside_the_output(width, height, seed, size):
    rng = np.random.default_rng(seed)
    crop = random_resized_crop_xywh(width, height, (0.9, 1.0), (3 / 4, 4 / 3), rng)
    assert crop.left >= 0 and crop.left + crop.width <= width
    assert crop.top >= 0 and crop.top + crop.height <= height
    x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
    box = BoxXYXY(x0, y0, int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1)))
    out = box_xyxy_in_output(box, crop, size)
    if out is not None:
        assert 0 <= out[0] < out[2] <= size and 0 <= out[1] < out[3] <= size
        gt_map = rasterise_box_xyxy(out, size)
        assert gt_map.sum() >= 1
    whole = box_xyxy_in_output(box, type(crop)(0, 0, width, height), size)
    assert whole is not None


def test_rasterised_boxes_are_inclusive_like_the_reference():
    # open_clip_train/data.py: map[floor(y0):ceil(y1)+1, floor(x0):ceil(x1)+1] = 1
    gt_map = rasterise_box_xyxy((1.5, 2.0, 3.2, 4.0), 6)
    assert gt_map[2:5, 1:5].all() and gt_map.sum() == 12
    whole = rasterise_box_xyxy((0.0, 0.0, 6.0, 6.0), 6)  # the global caption's box: clipped, whole image
    assert whole.all()
    thin = rasterise_box_xyxy((2.0, 2.0, 2.0, 3.0), 6)  # integer edges still mark both end pixels
    assert thin[2:4, 2].all() and thin.sum() == 2


# -- balancing, reading --------------------------------------------------------------------------------
def test_source_weights_equalise_the_sources(corpus):
    manifest = Storage(str(corpus)).read_json(MANIFEST_KEY)
    weights = source_balanced_weights(manifest)
    assert weights == {"src-a": 1.0, "src-b": 4.0}
    counts = Counter(s.source for s in SCENES if s.split == "train")
    assert len({counts[source] * weight for source, weight in weights.items()}) == 1
    assert source_balanced_weights({"shards": [], "sources": {"x": 3, "y": 6}}, split=None) == {"x": 2.0, "y": 1.0}


def test_iter_samples_reads_the_split_in_process(corpus, tokenizer_path):
    samples = list(iter_samples(str(corpus), "train", _transform(tokenizer_path)))
    assert sorted(s["image_id"] for s in samples) == sorted(s.image_id for s in SCENES if s.split == "train")
    assert len(list(iter_samples(str(corpus), "train", _transform(tokenizer_path), limit=2))) == 2


def test_ray_data_reads_and_balances_the_corpus(corpus, tokenizer_path, ray_local):
    assert read_corpus(str(corpus), "train").count() == 5
    assert read_corpus(str(corpus), "validation").count() == 1
    dataset = training_dataset(str(corpus), "train", _transform(tokenizer_path), seed=1)
    samples = dataset.take_all()
    by_source = Counter(s["source"] for s in samples)
    assert by_source == {"src-a": 4, "src-b": 4}  # src-b's single image, upsampled four times
    rotated = [s for s in samples if s["image_id"] == "rotated"]
    # Each copy draws its own caption and crop (some draws coincide: global captions and the fallback crop).
    assert len({s["pixel_values"].tobytes() + s["input_ids"].tobytes() for s in rotated}) > 1
    first = samples[0]
    assert np.asarray(first["pixel_values"]).shape == (3, SIZE, SIZE)
    assert np.asarray(first["input_ids"]).shape == (CONTEXT,)


# -- corpus check ---------------------------------------------------------------------------------
def test_check_corpus_accepts_a_good_corpus(corpus):
    check = check_corpus(str(corpus))
    assert check.ok, check.problems
    assert check.counts["train"]["images"] == 5 and check.sources == {"src-a": 5, "src-b": 1}


def _copy(corpus: Path, tmp_path: Path) -> tuple[Path, Storage]:
    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    return root, Storage(str(root))


def test_check_corpus_reports_a_missing_shard(corpus, tmp_path):
    root, storage = _copy(corpus, tmp_path)
    train_keys = [s["key"] for s in storage.read_json(MANIFEST_KEY)["shards"] if s["split"] == "train"]
    storage.delete(train_keys[-1])
    check = check_corpus(str(root))
    assert not check.ok and any(f"{train_keys[-1].rsplit('/', 1)[-1]} is missing" in p for p in check.problems)


def test_check_corpus_reports_a_wrong_schema_version_and_an_empty_train_split(corpus, tmp_path):
    root, storage = _copy(corpus, tmp_path)
    manifest = storage.read_json(MANIFEST_KEY)
    manifest["schema_version"] = 999
    manifest["counts"]["train"]["images"] = 0
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "train"]
    storage.write_json_atomic(MANIFEST_KEY, manifest)
    problems = " | ".join(check_corpus(str(root)).problems)
    assert "schema_version is 999" in problems
    assert "train split has no images" in problems and "no train shards" in problems


def test_check_corpus_reports_a_foreign_schema_and_a_missing_manifest(corpus, tmp_path):
    root, storage = _copy(corpus, tmp_path)
    first_train = next(s["key"] for s in storage.read_json(MANIFEST_KEY)["shards"] if s["split"] == "train")
    storage.write_parquet_atomic(first_train, pa.table({"image_id": ["x"] * 3}))
    problems = " | ".join(check_corpus(str(root)).problems)
    assert "does not have CORPUS_SCHEMA" in problems and "'regions'" in problems
    empty = check_corpus(str(tmp_path / "nothing-here"))
    assert not empty.ok and "manifest.json" in empty.problems[0]

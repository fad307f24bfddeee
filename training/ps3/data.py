"""PS3 pre-training data: packed corpus shards -> (image, box, caption) training samples (spec sections 1.5, 1.6).

One corpus row (one image) becomes one sample per pass: one (box, local caption) pair drawn at random, or
the global caption with probability 0.25 when the row has both kinds (always when it has only a global
caption). The caption is cleaned and sentence-masked, the image goes through a square RandomResizedCrop
with the box transformed jointly, and the box becomes a pixel-level GT selection map.

Every random choice comes from a generator seeded by (seed, epoch, copy index, image id), so a sample is
the same whichever worker makes it and in whatever order, and changes from epoch to epoch. With
``epoch=None`` the draws come from fresh entropy instead: a Ray Dataset that a trainer iterates several
times (one pass per epoch) then draws new boxes, captions, crops and order on every pass, unreproducibly.

Ray Data path::

    check_corpus(uri)                                   # before asking for GPUs
    transform = CorpusSampleTransform(image_size=1512, tokenizer_path=...)
    ds = training_dataset(uri, "train", transform, seed=0, epoch=0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from ps3_engine.infra.storage import S3Settings, Storage, read_uri_bytes
from ps3_engine.schemas.corpus import CORPUS_SCHEMA, MANIFEST_KEY, SCHEMA_VERSION
from ps3_engine.stages.captioning.hygiene import strip_boilerplate
from ps3_engine.stages.geometry import BoxXYXY
from ps3_engine.training.common.skips import record_drop, record_skip
from ps3_engine.training.ps3.tokenizer import load_text_tokenizer

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
MAX_MASK_START = 2  # sentence masking starts at sentence 0, 1 or 2 (spec 1.6)
CROP_ATTEMPTS = 10  # RandomResizedCrop's own attempts, and ours to keep the box in view


class SampleError(Exception):
    """A corpus row that cannot become a training sample; ``reason`` is the slug it is counted under.

    Reasons: ``no_caption``, ``no_image``, ``undecodable_image``, ``size_mismatch``, ``box_out_of_view``
    (PS3); ``prompt_too_long`` (VILA-HD).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# -- randomness ------------------------------------------------------------------------------------
def sample_rng(
    seed: int, epoch: int | None, image_id: str, copy_index: int = 0, stream: int = 0
) -> np.random.Generator:
    """A generator that depends only on its arguments (not on worker, order or process); fresh when epoch is None."""
    if epoch is None:
        return np.random.default_rng()
    image_key = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, epoch, copy_index, stream, image_key])


# -- text ------------------------------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_SPLIT.split(text.strip()) if s]


def mask_sentences(text: str, rng: np.random.Generator) -> str:
    """Keep a random contiguous span of sentences: start in [0, min(n-1, 2)], then a random length >= 1."""
    sentences = split_sentences(text)
    if len(sentences) <= 1:
        return text.strip()
    start = int(rng.integers(0, min(len(sentences) - 1, MAX_MASK_START) + 1))
    stop = int(rng.integers(start + 1, len(sentences) + 1))
    return " ".join(sentences[start:stop])


def usable_regions(row: dict[str, Any], skip_counter: str | None = None) -> list[tuple[BoxXYXY, str]]:
    """The (box, cleaned caption) pairs of a row whose caption is non-empty and whose box covers pixels.

    A box with zero width or height, inverted, or wholly outside the image is left out and counted
    (``dropped_regions/degenerate_box``), as is an empty caption (``dropped_regions/empty_caption``).
    """
    width, height = row.get("width") or 0, row.get("height") or 0
    regions = []
    for region in row.get("regions") or []:
        caption = strip_boilerplate(region["caption"] or "")
        x0, y0, x1, y1 = region["x0"], region["y0"], region["x1"], region["y1"]
        if not caption:
            record_drop(skip_counter, "empty_caption")
        elif min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0):
            record_drop(skip_counter, "degenerate_box")
        else:
            regions.append((BoxXYXY(x0, y0, x1, y1), caption))
    return regions


def choose_caption(
    row: dict[str, Any], rng: np.random.Generator, global_caption_prob: float, skip_counter: str | None = None
) -> tuple[BoxXYXY | None, str]:
    """One (box, cleaned caption) for this pass; the box is None when the global caption was chosen.

    Rows with both kinds use the global caption with ``global_caption_prob``; rows with only a global
    caption always use it; rows without one (documents) never do. Unusable regions are left out
    (``usable_regions``).

    Raises:
        SampleError: when the row has no usable caption of either kind.
    """
    regions = usable_regions(row, skip_counter)
    global_caption = strip_boilerplate(row.get("global_caption") or "")
    use_global = rng.random() < global_caption_prob
    if global_caption and (use_global or not regions):
        return None, global_caption
    if not regions:
        raise SampleError(
            "the row has no usable caption (no global caption, no region with a caption and a box)", "no_caption"
        )
    return regions[int(rng.integers(len(regions)))]


# -- geometry (pure; boxes are xyxy pixels, half-open, as in stages.geometry) ---------------------------
class CropXYWH(NamedTuple):
    """A crop of the source image in integer pixels: left, top, width, height."""

    left: int
    top: int
    width: int
    height: int


def random_resized_crop_xywh(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> CropXYWH:
    """torchvision's ``RandomResizedCrop.get_params`` with an explicit generator (same distribution)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return CropXYWH(left, top, crop_w, crop_h)
    in_ratio = width / height
    crop_w, crop_h = width, height
    if in_ratio < min(ratio):
        crop_h = round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_w = round(height * max(ratio))
    return CropXYWH((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h)


def box_xyxy_in_output(box: BoxXYXY, crop: CropXYWH, size: int) -> tuple[float, float, float, float] | None:
    """The box in the ``size`` x ``size`` output of resizing ``crop``, clipped; None when nothing is left."""
    scale_x, scale_y = size / crop.width, size / crop.height
    x0 = min(max((box.x0 - crop.left) * scale_x, 0.0), size)
    y0 = min(max((box.y0 - crop.top) * scale_y, 0.0), size)
    x1 = min(max((box.x1 - crop.left) * scale_x, 0.0), size)
    y1 = min(max((box.y1 - crop.top) * scale_y, 0.0), size)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def crop_keeping_box_xywh(
    width: int,
    height: int,
    box: BoxXYXY | None,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> CropXYWH:
    """A random resized crop that keeps part of ``box`` in view; the whole image (a plain resize) otherwise."""
    for _ in range(CROP_ATTEMPTS):
        crop = random_resized_crop_xywh(width, height, scale, ratio, rng)
        if box is None or box_xyxy_in_output(box, crop, size) is not None:
            return crop
    return CropXYWH(0, 0, width, height)


def rasterise_box_xyxy(box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Pixel GT map [size, size] uint8, inclusive like the reference: rows ``floor(y0)..ceil(y1)`` and
    columns ``floor(x0)..ceil(x1)``, both ends included (``open_clip_train/data.py`` slices to ``ceil + 1``),
    clipped to the image. A box reaching the image's end therefore marks the last row/column too.
    """
    x0, y0 = min(max(math.floor(box[0]), 0), size - 1), min(max(math.floor(box[1]), 0), size - 1)
    x1, y1 = min(math.ceil(box[2]) + 1, size), min(math.ceil(box[3]) + 1, size)
    gt_map = np.zeros((size, size), dtype=np.uint8)
    gt_map[y0:y1, x0:x1] = 1
    return gt_map


# -- the transform ---------------------------------------------------------------------------------
def decode_oriented(data: bytes) -> Image.Image:
    """Decode to RGB in the EXIF-oriented frame (the frame the corpus boxes are in)."""
    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


@dataclass(frozen=True)
class CorpusSampleTransform:
    """Corpus row -> training sample (numpy arrays). Picklable; the tokenizer loads once per process.

    Output: ``pixel_values`` [3, S, S] float32 (normalised), ``gt_map`` [S, S] uint8, ``input_ids`` [L] int64
    padded to the context length (no attention mask: the SigLIP text tower reads the pads, see
    ``PS3CLIP.encode_text``), ``is_global`` bool, ``image_id`` and ``source`` str.
    """

    image_size: int
    tokenizer_path: str
    context_length: int = 64
    global_caption_prob: float = 0.25
    sentence_masking: bool = True
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # SigLIP / SigLIP2
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    seed: int = 0
    epoch: int | None = 0  # None: fresh randomness on every call (see the module docstring)
    s3: S3Settings | None = field(default=None, compare=False)
    skip_counter: str | None = None  # the launch's counter actor (training.common.skips); None = this process

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.context_length < 1:
            raise ValueError(f"image_size {self.image_size} and context_length {self.context_length} must be >= 1")
        if not 0.0 <= self.global_caption_prob <= 1.0:
            raise ValueError(f"global_caption_prob {self.global_caption_prob} is not in [0, 1]")
        if self.seed < 0 or (self.epoch is not None and self.epoch < 0):
            raise ValueError("seed and epoch must be >= 0")

    def for_epoch(self, seed: int, epoch: int | None) -> CorpusSampleTransform:
        return dataclasses.replace(self, seed=seed, epoch=epoch)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """One sample from one corpus row.

        Raises:
            SampleError: for a row that cannot be used (no caption, undecodable image, wrong size). Failures
                to *read* an ``image_ref`` propagate (after the storage layer's retries), so an S3 outage
                fails the task instead of silently thinning the data.
        """
        rng = sample_rng(self.seed, self.epoch, row["image_id"], int(row.get("copy_index") or 0))
        box, caption = choose_caption(row, rng, self.global_caption_prob, self.skip_counter)
        if self.sentence_masking:
            caption = mask_sentences(caption, rng)
        image = self._image(row)
        crop = crop_keeping_box_xywh(*image.size, box, self.image_size, self.crop_scale, self.crop_ratio, rng)
        size = self.image_size
        out_box = (0.0, 0.0, float(size), float(size)) if box is None else box_xyxy_in_output(box, crop, size)
        if out_box is None:  # usable_regions keeps only boxes with pixels in the image, so not expected
            raise SampleError(f"the box {tuple(box) if box else None} is not in view", "box_out_of_view")
        resized = image.resize(
            (size, size),
            Image.Resampling.BICUBIC,
            box=(crop.left, crop.top, crop.left + crop.width, crop.top + crop.height),
        )
        tokens = load_text_tokenizer(self.tokenizer_path, self.s3)(
            caption, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="np"
        )
        return {
            "pixel_values": self._normalise(resized),
            "gt_map": rasterise_box_xyxy(out_box, size),
            "input_ids": tokens["input_ids"][0].astype(np.int64),
            "is_global": box is None,
            "image_id": str(row["image_id"]),
            "source": str(row["source_list"]),
        }

    def samples(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """``[sample]``, or ``[]`` for a row that cannot be used (counted and logged once): for ``flat_map``."""
        try:
            return [self(row)]
        except SampleError as error:
            record_skip(self.skip_counter, error.reason, str(row.get("image_id")), str(error))
            return []

    def _image(self, row: dict[str, Any]) -> Image.Image:
        data = row.get("image_bytes")
        if not data:
            if not row.get("image_ref"):
                raise SampleError("the row has neither image bytes nor an image reference", "no_image")
            data = read_uri_bytes(row["image_ref"], self.s3)
        try:
            image = decode_oriented(bytes(data))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise SampleError(
                f"cannot decode the image: {type(error).__name__}: {error}", "undecodable_image"
            ) from error
        if image.size != (row["width"], row["height"]):
            message = f"decoded size {image.size} is not the corpus size {(row['width'], row['height'])}"
            raise SampleError(message, "size_mismatch")
        return image

    def _normalise(self, image: Image.Image) -> np.ndarray:
        pixels_hwc = np.asarray(image, dtype=np.float32) / 255.0
        pixels_hwc = (pixels_hwc - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels_hwc.transpose(2, 0, 1))


# -- reading the corpus ----------------------------------------------------------------------------
def split_shard_keys(manifest: dict[str, Any], split: str) -> list[str]:
    return [shard["key"] for shard in manifest.get("shards", []) if shard.get("split") == split]


def source_counts(manifest: dict[str, Any], split: str | None = "train") -> dict[str, int]:
    """Images per source in ``split`` (from the shard entries), or in the whole corpus when split is None."""
    if split is None:
        return {s: int(n) for s, n in manifest.get("sources", {}).items()}
    counts: dict[str, int] = {}
    for shard in manifest.get("shards", []):
        if shard.get("split") == split:
            for source, n in shard.get("sources", {}).items():
                counts[source] = counts.get(source, 0) + int(n)
    return counts


def source_balanced_weights(manifest: dict[str, Any], split: str | None = "train") -> dict[str, float]:
    """Per-source upsampling factors so every source contributes the same expected number of samples.

    ``weight[s] = max_count / count[s]`` (the largest source keeps 1.0), so ``count[s] * weight[s]`` is
    equal for every source: a sample is equally likely to come from each source (spec 1.6, [P2] App. B),
    like OpenCLIP's ``--train-data-upsampling-factors``.
    """
    counts = {s: n for s, n in source_counts(manifest, split).items() if n > 0}
    if not counts:
        return {}
    largest = max(counts.values())
    return {source: largest / n for source, n in counts.items()}


@dataclass(frozen=True)
class SourceUpsampler:
    """Row -> ``floor(w)`` copies plus one more with probability ``frac(w)``, each with its ``copy_index``."""

    weights: dict[str, float]
    seed: int
    epoch: int | None

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        whole, fraction = divmod(self.weights.get(row["source_list"], 1.0), 1.0)
        rng = sample_rng(self.seed, self.epoch, row["image_id"], stream=1)
        copies = int(whole) + int(rng.random() < fraction)
        return [{**row, "copy_index": index} for index in range(copies)]


def read_corpus(uri: str, split: str, s3: S3Settings | None = None) -> ray.data.Dataset:
    """The corpus rows of ``split`` as a Ray Dataset (the shards the manifest lists; local or S3).

    Raises:
        ValueError: when the manifest lists no shard for ``split``.
    """
    import ray.data

    storage = Storage(uri, s3)
    keys = split_shard_keys(storage.read_json(MANIFEST_KEY), split)
    if not keys:
        raise ValueError(f"corpus {uri} has no {split!r} shards")
    return ray.data.read_parquet([storage.path(k) for k in keys], filesystem=storage.filesystem)


def training_dataset(
    uri: str,
    split: str,
    transform: CorpusSampleTransform,
    seed: int,
    balance_sources: bool = True,
    *,
    epoch: int | None = 0,
    shuffle: bool = True,
    s3: S3Settings | None = None,
) -> ray.data.Dataset:
    """Ray Dataset of training samples for one epoch (``seed`` and ``epoch`` override the transform's).

    A fixed ``epoch`` makes every iteration of the returned dataset yield the same samples in the same
    order; pass ``epoch=None`` when the trainer iterates one dataset for several passes and each pass
    should draw anew (boxes, captions, crops, upsampled copies and the shuffle order).

    Balancing upsamples smaller sources (:class:`SourceUpsampler`), so one epoch holds about
    ``num_sources * largest_source`` samples. The copies of an image then sit next to each other, and
    the global shuffle (of the compact corpus rows, before decoding) spreads them over the epoch; keep
    ``shuffle`` on whenever ``balance_sources`` is, or copies of one image meet in a batch as negatives.
    """
    s3 = s3 or transform.s3
    transform = transform.for_epoch(seed, epoch)
    dataset = read_corpus(uri, split, s3)
    if balance_sources:
        weights = source_balanced_weights(Storage(uri, s3).read_json(MANIFEST_KEY), split)
        if any(w != 1.0 for w in weights.values()):
            dataset = dataset.flat_map(SourceUpsampler(weights, seed, epoch))
    if shuffle:
        shuffle_seed = None if epoch is None else int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        dataset = dataset.random_shuffle(seed=shuffle_seed)
    return dataset.flat_map(transform.samples)


def iter_samples(
    uri: str, split: str, transform: CorpusSampleTransform, s3: S3Settings | None = None, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Samples in shard order in this process, without balancing or shuffling (debugging, notebooks)."""
    storage = Storage(uri, s3 or transform.s3)
    produced = 0
    for key in split_shard_keys(storage.read_json(MANIFEST_KEY), split):
        with storage.filesystem.open_input_file(storage.path(key)) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=32):
                for row in batch.to_pylist():
                    for sample in transform.samples(row):
                        if limit is not None and produced >= limit:
                            return
                        produced += 1
                        yield sample


# -- checking the corpus before training ------------------------------------------------------------
@dataclass
class CorpusCheck:
    uri: str
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_corpus(uri: str, s3: S3Settings | None = None) -> CorpusCheck:
    """Validate a packed corpus from its manifest and Parquet footers only; never raises.

    Checks: the manifest exists and names ``corpus_row`` at this SCHEMA_VERSION; the train split has
    images; sources are listed; every listed shard exists, has CORPUS_SCHEMA and the row count the
    manifest says.
    """
    check = CorpusCheck(uri)
    try:
        storage = Storage(uri, s3)
        if not storage.exists(MANIFEST_KEY):
            check.problems.append(f"no {MANIFEST_KEY} under {uri} (run build-corpus first)")
            return check
        manifest = storage.read_json(MANIFEST_KEY)
        _check_manifest(manifest, check)
        for shard in manifest.get("shards", []):
            _check_shard(storage, shard, check)
    except Exception as error:  # the check reports, it does not raise
        check.problems.append(f"could not check the corpus: {type(error).__name__}: {error}")
    return check


def _check_manifest(manifest: dict[str, Any], check: CorpusCheck) -> None:
    check.counts = manifest.get("counts", {})
    check.sources = manifest.get("sources", {})
    if manifest.get("record_kind") != "corpus_row":
        check.problems.append(f"record_kind is {manifest.get('record_kind')!r}, not 'corpus_row'")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        check.problems.append(f"schema_version is {manifest.get('schema_version')!r}, this code reads {SCHEMA_VERSION}")
    if int(check.counts.get("train", {}).get("images", 0)) <= 0:
        check.problems.append("the train split has no images")
    if not check.sources:
        check.problems.append("the manifest lists no sources")
    if not split_shard_keys(manifest, "train"):
        check.problems.append("the manifest lists no train shards")


def _check_shard(storage: Storage, shard: dict[str, Any], check: CorpusCheck) -> None:
    key = shard.get("key", "?")
    if not storage.exists(key):
        check.problems.append(f"shard {key} is missing")
        return
    metadata = pq.read_metadata(storage.path(key), filesystem=storage.filesystem)
    schema = metadata.schema.to_arrow_schema()
    # The input list's extra columns follow CORPUS_SCHEMA's (pipeline/provenance.py); only the base is checked.
    base = list(schema)[: len(CORPUS_SCHEMA)]
    if len(base) != len(CORPUS_SCHEMA) or not all(f.equals(e) for f, e in zip(base, CORPUS_SCHEMA, strict=False)):
        check.problems.append(f"shard {key} does not have CORPUS_SCHEMA: {_schema_diff(schema)}")
    if metadata.num_rows != shard.get("rows"):
        check.problems.append(f"shard {key} has {metadata.num_rows} rows, the manifest says {shard.get('rows')}")


def _schema_diff(schema: Any) -> str:
    expected = {f.name: f for f in CORPUS_SCHEMA}
    actual = {f.name: f for f in schema}
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(n for n in set(expected) & set(actual) if not expected[n].equals(actual[n]))
    return f"missing {missing}, unexpected {extra}, different {changed}"

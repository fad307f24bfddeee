"""Corpus stage: one training-ready row per image from its crawl row, boxes and cleaned captions.

Per shard it joins the caption shard (primary input) with the segment and crawl shards of the same
shard id, keeps the boxes that got a usable local caption, attaches the global caption, assigns the
train/validation split from the image hash and carries the image bytes (or a reference) and the item's
provenance (URL as listed and as fetched, licence, attribution, the input row's extra columns) through.
Stored bytes leave upright: the few EXIF-rotated images are re-encoded with the orientation applied (see
:func:`upright_image_bytes`), so any decoder puts the boxes on the right pixels.
``pipeline/corpus.py`` then packs these per-shard rows into size-targeted corpus shards.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Literal

import pyarrow as pa
from PIL import Image, ImageOps, JpegImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.schemas import CAPTION_SCHEMA, IMAGE_SCHEMA, REGION_SCHEMA, conform_table, rows_to_table
from ps3_engine.schemas.corpus import CORPUS_PART_SCHEMA
from ps3_engine.stages.base import (
    BatchResult,
    Resources,
    ShardContext,
    Stage,
    error_row,
    errors_table,
    unexpected_error_row,
)
from ps3_engine.stages.joins import first_row_per_image

_JOINED_REGION = pa.struct(
    [
        pa.field("region_id", pa.string(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("caption", pa.string()),  # null when the region has no usable caption
    ]
)
# One image with everything known about it (the join of a caption, a segment and a crawl shard).
CORPUS_INPUT_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("final_url", pa.string()),
        pa.field("source_list", pa.string(), nullable=False),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("image_ref", pa.string()),
        pa.field("exif_orientation", pa.int8(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("license", pa.string()),
        pa.field("attribution", pa.string()),
        pa.field("metadata_json", pa.string(), nullable=False),
        pa.field("global_caption", pa.string()),
        pa.field("regions", pa.list_(_JOINED_REGION), nullable=False),
    ]
)
# Re-encoding quality for EXIF-rotated JPEGs: visually lossless; PNG and the rest are re-encoded losslessly.
UPRIGHT_JPEG_QUALITY = 95


class CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    validation_fraction: float = Field(0.01, ge=0, lt=1, description="share of images in the validation split")
    split_salt: str = Field("ps3", description="changing it reshuffles the split")
    image_storage: Literal["bytes", "reference"] = "bytes"
    min_local_captions: int = Field(1, ge=0, description="images with fewer captioned boxes are left out")
    include_global_caption: bool = True
    source_type: Literal["natural", "document"] = "natural"
    target_shard_bytes: int = Field(256 * 2**20, ge=1, description="approximate size of a packed corpus shard")
    batch_size: int = Field(256, ge=1)
    max_workers: int | None = Field(None, ge=1)


def split_for(image_id: str, validation_fraction: float, salt: str) -> str:
    """Deterministic split from the image hash: the same image lands in the same split in every run."""
    bucket = int(hashlib.sha256(f"{salt}:{image_id}".encode()).hexdigest()[:12], 16) / 16**12
    return "validation" if bucket < validation_fraction else "train"


def join_for_corpus(captions: pa.Table, regions: pa.Table, images: pa.Table) -> pa.Table:
    """Per image of the region shard: its crawl row, its ranked boxes with captions, its global caption.

    One row per image, however many crawl rows hold it (:func:`first_row_per_image`).
    """
    local: dict[str, str] = {}
    global_: dict[str, str] = {}
    for row in captions.select(["image_id", "region_id", "kind", "clean_text"]).to_pylist():
        if row["kind"] == "global":
            global_[row["image_id"]] = row["clean_text"]
        elif row["region_id"] is not None:
            local[row["region_id"]] = row["clean_text"]
    boxes: dict[str, list[dict[str, Any]]] = {}
    for row in regions.select(["image_id", "region_id", "x0", "y0", "x1", "y1", "rank"]).to_pylist():
        boxes.setdefault(row["image_id"], []).append({**row, "caption": local.get(row["region_id"])})
    rows = []
    wanted = set(boxes)
    for image in first_row_per_image(images).to_pylist():
        if image["image_id"] not in wanted:
            continue
        ranked = sorted(boxes[image["image_id"]], key=lambda r: r["rank"])
        rows.append(
            {
                "item_id": image["image_id"],
                **{k: image[k] for k in ("image_id", "source_ref", "final_url", "source_list", "image_bytes")},
                **{k: image[k] for k in ("image_ref", "exif_orientation", "width", "height", "license")},
                **{k: image[k] for k in ("attribution", "metadata_json")},
                "global_caption": global_.get(image["image_id"]),
                "regions": [{k: r[k] for k in _JOINED_REGION.names} for r in ranked],
            }
        )
    return rows_to_table(rows, CORPUS_INPUT_SCHEMA)


class CorpusStage(Stage):
    name = "corpus"
    input_schema = CORPUS_INPUT_SCHEMA
    output_schema = CORPUS_PART_SCHEMA
    config_model = CorpusConfig
    operational_fields = frozenset({"batch_size", "max_workers", "target_shard_bytes"})
    code_version = 2  # 2: provenance columns, upright bytes

    def __init__(self, config: CorpusConfig) -> None:
        super().__init__(config)
        self.config: CorpusConfig = config

    @property
    def resources(self) -> Resources:
        return Resources(num_cpus=1.0, max_workers=self.config.max_workers, batch_size=self.config.batch_size)

    def join_inputs(self, primary: pa.Table, side: list[pa.Table]) -> pa.Table:
        regions, images = side
        return join_for_corpus(
            conform_table(primary, CAPTION_SCHEMA),
            conform_table(regions, REGION_SCHEMA),
            conform_table(images, IMAGE_SCHEMA),
        )

    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        rows, errors = [], []
        for image in batch.to_pylist():
            try:
                self._add_image(image, context, rows, errors)
            except Exception as exc:  # per-item isolation: one image never fails its shard
                errors.append(
                    unexpected_error_row(context, item_id=image["image_id"], input_ref=image["source_ref"], exc=exc)
                )
        return BatchResult(rows_to_table(rows, CORPUS_PART_SCHEMA), errors_table(errors))

    def _add_image(
        self, image: dict[str, Any], context: ShardContext, rows: list[dict[str, Any]], errors: list[dict[str, Any]]
    ) -> None:
        """Append the image's corpus row or its error row (one of the two, as its last step)."""
        config = self.config
        captioned = [r for r in image["regions"] if r["caption"]]
        global_caption = image["global_caption"] if config.include_global_caption else None
        if len(captioned) < config.min_local_captions or not (captioned or global_caption):
            errors.append(
                error_row(
                    context,
                    item_id=image["image_id"],
                    input_ref=image["source_ref"],
                    reason="too_few_captions",
                    message=f"{len(captioned)} of {len(image['regions'])} boxes have a usable caption; "
                    f"corpus.min_local_captions is {config.min_local_captions}",
                    category="filtered",
                )
            )
            return
        keep_bytes = config.image_storage == "bytes" and image["image_bytes"] is not None
        orientation = image["exif_orientation"]
        data = image["image_bytes"] if keep_bytes else None
        if data is not None and orientation != 1:
            data, orientation = upright_image_bytes(data), 1
        rows.append(
            {
                "image_id": image["image_id"],
                "split": split_for(image["image_id"], config.validation_fraction, config.split_salt),
                "source_type": config.source_type,
                "url": image["source_ref"],
                "final_url": image["final_url"],
                "source_list": image["source_list"],
                "image_bytes": data,
                "image_ref": None if keep_bytes else (image["image_ref"] or image["source_ref"]),
                "exif_orientation": orientation,
                "width": image["width"],
                "height": image["height"],
                "license": image["license"],
                "attribution": image["attribution"],
                "global_caption": global_caption,
                "regions": [
                    {k: r[k] for k in ("region_id", "x0", "y0", "x1", "y1")} | {"caption": r["caption"]}
                    for r in captioned
                ],
                "input_columns_json": image["metadata_json"],
            }
        )


def upright_image_bytes(data: bytes) -> bytes:
    """Re-encode an EXIF-rotated image with its orientation applied and the orientation tag reset.

    JPEG (and MPO, whose first frame is a JPEG) stays JPEG at quality 95 with the original chroma
    subsampling, ICC profile and remaining EXIF; every other format becomes lossless PNG. Boxes are
    computed in this upright frame, so after this ``Image.open(bytes)`` needs no transpose.

    Raises:
        OSError / PIL.UnidentifiedImageError: the bytes do not decode (the crawl already checked them).
    """
    with Image.open(io.BytesIO(data)) as original:
        is_jpeg = original.format in ("JPEG", "MPO")
        subsampling = JpegImagePlugin.get_sampling(original) if is_jpeg else -1
        icc_profile = original.info.get("icc_profile")
        upright = ImageOps.exif_transpose(original)
    out = io.BytesIO()
    exif = upright.getexif()
    exif.pop(0x0112, None)  # orientation: the pixels are upright now
    if is_jpeg:
        if upright.mode not in ("RGB", "L", "CMYK"):
            upright = upright.convert("RGB")
        upright.save(
            out,
            "JPEG",
            quality=UPRIGHT_JPEG_QUALITY,
            subsampling=max(subsampling, 0),
            icc_profile=icc_profile,
            exif=exif.tobytes(),
        )
    else:
        if upright.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
        upright.save(out, "PNG", icc_profile=icc_profile, exif=exif.tobytes())
    return out.getvalue()

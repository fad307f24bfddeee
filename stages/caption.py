"""Caption stage: an image with its selected boxes -> one local caption per box and one global caption.

Two phases, so the accelerator is never starved by image work:

* ``prepare_batch`` (CPU, runs in its own Ray Data operator ahead of the model actors): decode each
  image once at full resolution, cut every box from it, resize the global image and each crop to the
  captioner's pixel budget (paper: 256*28*28) and encode them as JPEG for transport.
* ``process_batch`` (model actor): build the paper's two-image requests (global image, crop, prompt)
  grouped by image, run the backend, clean the outputs and write caption rows; unusable outputs and
  failed requests become error rows with a reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.infra.storage import S3Settings
from ps3_engine.schemas import CAPTION_SCHEMA, rows_to_table
from ps3_engine.stages.base import (
    UNEXPECTED_ERROR,
    BatchResult,
    Resources,
    ShardContext,
    Stage,
    error_row,
    errors_table,
    unexpected_error_row,
)
from ps3_engine.stages.captioning.backends import CaptionBackend, CaptionRequest, CaptionResult, SamplingSettings
from ps3_engine.stages.captioning.hygiene import HygieneSettings, clean_caption
from ps3_engine.stages.captioning.openai_backend import OpenAICaptioner, OpenAISettings
from ps3_engine.stages.captioning.prompts import PromptTemplates
from ps3_engine.stages.captioning.transformers_backend import TransformersCaptioner, TransformersSettings
from ps3_engine.stages.captioning.vllm_backend import VllmCaptioner, VllmSettings
from ps3_engine.stages.geometry import BoxXYXY, fit_to_pixel_budget, is_inside
from ps3_engine.stages.imaging import ImageRejected, load_rgb, stored_image_bytes
from ps3_engine.stages.joins import first_row_per_image

logger = logging.getLogger(__name__)

PS3_MAX_PIXELS = 256 * 28 * 28

_BOX_TYPE = pa.struct(
    [
        pa.field("region_id", pa.string(), nullable=False),
        pa.field("x0", pa.int32(), nullable=False),
        pa.field("y0", pa.int32(), nullable=False),
        pa.field("x1", pa.int32(), nullable=False),
        pa.field("y1", pa.int32(), nullable=False),
    ]
)
# One image with the boxes the segment stage chose for it (the join of a region and a crawl shard).
CAPTION_INPUT_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("image_bytes", pa.large_binary()),
        pa.field("image_ref", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("regions", pa.list_(_BOX_TYPE), nullable=False),
    ]
)
_CROP_TYPE = pa.struct(
    [pa.field("region_id", pa.string(), nullable=False), pa.field("crop_jpeg", pa.binary(), nullable=False)]
)
# The CPU phase's output: the resized global image and crops, ready for the model.
CAPTION_PREPARED_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_ref", pa.string(), nullable=False),
        pa.field("global_jpeg", pa.binary(), nullable=False),
        pa.field("crops", pa.list_(_CROP_TYPE), nullable=False),
    ]
)


class HygieneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_words: int = Field(3, ge=1)
    min_distinct_trigram_ratio: float = Field(0.5, ge=0, le=1)
    max_top_word_share: float = Field(0.4, gt=0, le=1)

    def settings(self) -> HygieneSettings:
        return HygieneSettings(**self.model_dump())


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    model: str = Field("Qwen/Qwen2-VL-7B-Instruct", description="local folder, s3:// prefix or hub id")
    prompts: PromptTemplates = PromptTemplates()
    sampling: SamplingSettings = SamplingSettings()
    max_pixels: int = Field(PS3_MAX_PIXELS, ge=28 * 28, description="pixel budget per image sent (paper)")
    min_pixels: int = Field(4 * 28 * 28, ge=1)
    pixel_multiple: int = Field(28, ge=1, description="sides rounded to this (Qwen2-VL: patch 14 x merge 2)")
    global_captions: bool = Field(True, description="also caption each whole image (natural images)")
    transport_jpeg_quality: int = Field(95, ge=50, le=100)
    hygiene: HygieneConfig = HygieneConfig()
    batch_size: int = Field(8, ge=1, description="images per model call (each gives 1 + boxes requests)")
    max_workers: int | None = Field(None, ge=1)
    num_gpus: float = Field(1.0, ge=0, description="GPUs per transformers worker when a GPU is used")
    transformers: TransformersSettings = TransformersSettings()
    vllm: VllmSettings = VllmSettings()
    openai: OpenAISettings = OpenAISettings()
    s3: S3Settings = S3Settings()


def caption_id_for(image_id: str, region_id: str | None, prompt_version: str) -> str:
    subject = region_id if region_id is not None else f"{image_id}:global"
    return hashlib.sha256(f"{subject}:{prompt_version}".encode()).hexdigest()[:32]


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def resize_to_budget(image: Image.Image, config: CaptionConfig) -> Image.Image:
    size = fit_to_pixel_budget(*image.size, config.max_pixels, config.min_pixels, config.pixel_multiple)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def join_regions_with_images(regions: pa.Table, images: pa.Table) -> pa.Table:
    """Group region rows by image and attach each image's bytes/reference (``CAPTION_INPUT_SCHEMA``).

    One row per image, however many crawl rows hold it (:func:`first_row_per_image`).
    """
    boxes: dict[str, list[dict[str, Any]]] = {}
    for row in regions.select(["image_id", "region_id", "x0", "y0", "x1", "y1", "rank"]).to_pylist():
        boxes.setdefault(row["image_id"], []).append(row)
    wanted = pa.array(sorted(boxes), pa.string())
    images = first_row_per_image(images.filter(pc.is_in(images.column("image_id"), wanted)))
    rows = []
    for image in images.to_pylist():
        ranked = sorted(boxes[image["image_id"]], key=lambda r: r["rank"])
        rows.append(
            {
                "item_id": image["image_id"],
                "image_id": image["image_id"],
                "source_ref": image["source_ref"],
                "image_bytes": image["image_bytes"],
                "image_ref": image["image_ref"],
                "width": image["width"],
                "height": image["height"],
                "regions": [{k: r[k] for k in ("region_id", "x0", "y0", "x1", "y1")} for r in ranked],
            }
        )
    missing = set(boxes) - {r["image_id"] for r in rows}
    if missing:
        raise ValueError(f"{len(missing)} images with regions are missing from the crawl shard, e.g. {min(missing)}")
    return rows_to_table(rows, CAPTION_INPUT_SCHEMA)


class CaptionStage(Stage):
    name = "caption"
    input_schema = CAPTION_INPUT_SCHEMA
    prepared_schema: ClassVar[pa.Schema] = CAPTION_PREPARED_SCHEMA
    output_schema = CAPTION_SCHEMA
    config_model = CaptionConfig
    operational_fields = frozenset({"batch_size", "max_workers", "num_gpus", "s3"})
    code_version = 1

    def __init__(self, config: CaptionConfig) -> None:
        super().__init__(config)
        self.config: CaptionConfig = config
        self._backend: CaptionBackend | None = None

    @property
    def resources(self) -> Resources:
        config = self.config
        if config.backend == "vllm":
            return Resources(
                num_cpus=1.0,
                # vLLM's CPU build (device=cpu) asks Ray for no GPU; the CUDA build for all of its tensor parallel.
                num_gpus=float(config.vllm.tensor_parallel_size) if config.vllm.device == "cuda" else 0.0,
                uses_model=True,
                max_workers=config.max_workers,
                batch_size=config.batch_size,
            )
        gpus = config.num_gpus if config.backend == "transformers" and config.transformers.device != "cpu" else 0.0
        return Resources(
            num_cpus=1.0,
            num_gpus=gpus,
            uses_model=True,
            max_workers=config.max_workers,
            batch_size=config.batch_size,
            gpu_optional=config.transformers.device == "auto",
        )

    # -- inputs --------------------------------------------------------------------------------
    def join_inputs(self, primary: pa.Table, side: list[pa.Table]) -> pa.Table:
        (images,) = side
        return join_regions_with_images(primary, images)

    def _backend_for(self) -> CaptionBackend:
        config = self.config
        if config.backend == "transformers":
            return TransformersCaptioner(config.model, config.sampling, config.transformers, config.s3)
        if config.backend == "vllm":
            return VllmCaptioner(
                config.model, config.sampling, config.vllm, config.max_pixels, config.min_pixels, config.s3
            )
        return OpenAICaptioner(config.model, config.sampling, config.openai)

    def setup(self) -> None:
        self._backend = self._backend_for()
        self._backend.setup()

    def teardown(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None

    # -- CPU phase -----------------------------------------------------------------------------
    def prepare_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        prepared, errors = [], []
        for row in batch.to_pylist():
            try:
                prepared.append(self._prepare_image(row))
            except (ImageRejected, OSError, ValueError) as exc:
                errors.append(self._error(context, row["image_id"], row["source_ref"], "undecodable", str(exc)))
            except Exception as exc:  # per-item isolation: one image never fails its shard
                errors.append(
                    unexpected_error_row(context, item_id=row["image_id"], input_ref=row["source_ref"], exc=exc)
                )
        return BatchResult(rows_to_table(prepared, CAPTION_PREPARED_SCHEMA), errors_table(errors))

    def _prepare_image(self, row: dict[str, Any]) -> dict[str, Any]:
        data = stored_image_bytes(row, self.config.s3)
        image = load_rgb(data)
        if image.size != (row["width"], row["height"]):
            raise ValueError(f"decoded size {image.size} differs from the recorded {row['width']}x{row['height']}")
        quality = self.config.transport_jpeg_quality
        crops = []
        for region in row["regions"]:
            box = BoxXYXY(region["x0"], region["y0"], region["x1"], region["y1"])
            if not is_inside(box, *image.size):
                raise ValueError(f"box {tuple(box)} of region {region['region_id']} is outside {image.size}")
            crop = resize_to_budget(image.crop(tuple(box)), self.config)
            crops.append({"region_id": region["region_id"], "crop_jpeg": encode_jpeg(crop, quality)})
        return {
            "item_id": row["item_id"],
            "image_id": row["image_id"],
            "source_ref": row["source_ref"],
            "global_jpeg": encode_jpeg(resize_to_budget(image, self.config), quality),
            "crops": crops,
        }

    # -- model phase ---------------------------------------------------------------------------
    def process_batch(self, batch: pa.Table, context: ShardContext) -> BatchResult:
        assert self._backend is not None, "setup() was not called"
        prompts = self.config.prompts
        requests: list[CaptionRequest] = []
        subjects: dict[str, tuple[dict[str, Any], str | None]] = {}
        for row in batch.to_pylist():
            global_image = Image.open(io.BytesIO(row["global_jpeg"]))
            if self.config.global_captions:
                request_id = caption_id_for(row["image_id"], None, prompts.version)
                subjects[request_id] = (row, None)
                requests.append(
                    CaptionRequest(request_id, row["image_id"], [global_image], prompts.global_, [row["global_jpeg"]])
                )
            for crop in row["crops"]:
                request_id = caption_id_for(row["image_id"], crop["region_id"], prompts.version)
                subjects[request_id] = (row, crop["region_id"])
                requests.append(
                    CaptionRequest(
                        request_id,
                        row["image_id"],
                        [global_image, Image.open(io.BytesIO(crop["crop_jpeg"]))],
                        prompts.local,
                        [row["global_jpeg"], crop["crop_jpeg"]],
                    )
                )
        results = self._generate_isolated(requests)
        captions, errors = [], []
        sampling_json = json.dumps(self.config.sampling.model_dump(mode="json"), sort_keys=True)
        hygiene = self.config.hygiene.settings()
        for result in results:
            row, region_id = subjects[result.request_id]
            item_id = region_id or f"{row['image_id']}:global"
            if not result.ok:
                errors.append(
                    self._error(
                        context,
                        item_id,
                        row["source_ref"],
                        result.error_reason or "caption_failed",
                        result.error_message,
                        transient=result.transient,
                    )
                )
                continue
            try:
                cleaned = clean_caption(result.text, result.finish_reason, hygiene)
            except Exception as exc:
                errors.append(unexpected_error_row(context, item_id=item_id, input_ref=row["source_ref"], exc=exc))
                continue
            if cleaned.reject_reason:
                message = f"{cleaned.detail}; raw: {result.text[:300]!r}"
                errors.append(
                    self._error(context, item_id, row["source_ref"], cleaned.reject_reason, message, "filtered")
                )
                continue
            captions.append(self._caption_row(row, region_id, result, cleaned.text, context, sampling_json))
        return BatchResult(rows_to_table(captions, CAPTION_SCHEMA), errors_table(errors))

    def _generate_isolated(self, requests: list[CaptionRequest]) -> list[CaptionResult]:
        """The backend's results; when a whole batch raises, each request alone, and a raising one is its error.

        Backends report per-request failures as results; an exception is unexpected, and one bad request
        must not cost the other captions of the shard (the first exception is logged with its traceback).
        """
        assert self._backend is not None
        try:
            return self._backend.generate(requests)
        except Exception as exc:
            if len(requests) == 1:
                logger.warning("caption: request %s failed unexpectedly", requests[0].request_id, exc_info=exc)
                return [
                    CaptionResult(
                        requests[0].request_id,
                        error_reason=UNEXPECTED_ERROR,
                        error_message=f"{type(exc).__name__}: {exc}",
                    )
                ]
            logger.warning("caption: batch of %d failed (%s); captioning one at a time", len(requests), exc)
            return [result for request in requests for result in self._generate_isolated([request])]

    def _caption_row(
        self,
        row: dict[str, Any],
        region_id: str | None,
        result: CaptionResult,
        clean_text: str,
        context: ShardContext,
        sampling_json: str,
    ) -> dict[str, Any]:
        return {
            "caption_id": result.request_id,
            "image_id": row["image_id"],
            "region_id": region_id,
            "shard_id": context.shard_id,
            "kind": "global" if region_id is None else "local",
            "raw_text": result.text,
            "clean_text": clean_text,
            "model": self.config.model,
            "prompt_version": self.config.prompts.version,
            "sampling_json": sampling_json,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "latency_ms": result.latency_ms,
        }

    def _error(
        self,
        context: ShardContext,
        item_id: str,
        input_ref: str,
        reason: str,
        message: str,
        category: str = "failed",
        transient: bool = False,
    ) -> dict[str, Any]:
        return error_row(
            context,
            item_id=item_id,
            input_ref=input_ref,
            reason=reason,
            message=message,
            category=category,
            transient=transient,
        )

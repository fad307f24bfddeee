"""SAM2 automatic mask generation (the ``sam2`` package), with the PS3 paper's settings as defaults.

The generator runs on the image at native resolution (``max_side`` None), so ``crop_n_layers=1`` cuts its
crops from the 2K-4K original, as the paper's crops are, not from a downscaled copy. Two things keep that
within a memory budget: the prompts of one batch are capped so their full-resolution mask logits fit
``mask_batch_mb`` (:func:`prompts_per_batch`), and masks leave the generator as column runs (SAM2's
uncompressed RLE), never as dense 8 MB-per-mask boolean arrays.

Weights come from a local path, an ``s3://`` URI (downloaded once into a local cache through the
storage seam) or ``hf://<repo>/<file>`` (the Hugging Face cache/hub). Random weights are only used
when explicitly allowed (tests), never as a silent fallback.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.infra.storage import S3Settings, is_s3_uri, read_uri_bytes
from ps3_engine.stages.segmenters.masks import ColumnRuns, MaskSet

logger = logging.getLogger(__name__)

SAM2_NATIVE_IMAGE_SIZE = 1024
MIN_POINTS_PER_BATCH = 4
# Masks SAM2 returns per point prompt with multimask_output=True (the AMG default).
MASKS_PER_PROMPT = 3
# Peak bytes per mask pixel while AMG post-processes one prompt batch, measured on SAM2 1.x's code path:
# float32 logits upsampled to the crop (4) plus the copy kept by the IoU filter (4), two transient
# stability-score threshold masks (2), the thresholded mask (1) ... per crop pixel; the mask padded to the
# full image (1), its column-major copy and the xor of neighbours for the RLE (2), and slack (1) per image pixel.
CROP_BYTES_PER_MASK_PIXEL = 11
IMAGE_BYTES_PER_MASK_PIXEL = 4


class Sam2Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_cfg: str = "configs/sam2.1/sam2.1_hiera_l.yaml"
    checkpoint: str | None = Field(None, description="local path, s3:// URI or hf://<repo>/<file>")
    allow_random_weights: bool = Field(False, description="tests only: build without a checkpoint")
    image_size: int = Field(SAM2_NATIVE_IMAGE_SIZE, ge=64, description="model input size (1024 for real weights)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    points_per_side: int = Field(24, ge=1)
    points_per_batch: int = Field(128, ge=1)
    crop_n_layers: int = Field(1, ge=0)
    crop_n_points_downscale_factor: int = Field(1, ge=1)
    pred_iou_thresh: float = 0.6
    stability_score_thresh: float = 0.85
    min_mask_region_area: int = Field(0, ge=0)
    max_side: int | None = Field(
        None, ge=64, description="long side of the image AMG sees (None: native resolution, the paper's crops)"
    )
    mask_batch_mb: int = Field(
        4096,
        ge=16,
        description="memory for one prompt batch's full-resolution masks (MiB); points_per_batch shrinks to fit",
    )
    weights_cache_dir: str = Field(default_factory=lambda: str(Path.home() / ".cache" / "ps3-engine" / "weights"))


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("segment.sam2.device is 'cuda' but no CUDA device is visible")
    return requested


def check_checkpoint_source(settings: Sam2Settings) -> None:
    """Cheap driver-side validation of the checkpoint setting (no download, no model build)."""
    source = settings.checkpoint
    if source is None:
        if not settings.allow_random_weights:
            raise ValueError(NO_CHECKPOINT_MESSAGE)
    elif source.startswith("hf://"):
        _split_hf(source)
    elif not is_s3_uri(source) and not Path(source).is_file():
        raise ValueError(f"SAM2 checkpoint {source!r} does not exist")


NO_CHECKPOINT_MESSAGE = (
    "no SAM2 checkpoint: set segment.sam2.checkpoint to a local path, an s3:// URI or hf://<repo>/<file> "
    "(e.g. hf://facebook/sam2.1-hiera-large/sam2.1_hiera_large.pt), or use segment.backend=classical"
)


def _split_hf(source: str) -> tuple[str, str]:
    repo_id, _, filename = source.removeprefix("hf://").rpartition("/")
    if not repo_id or not filename:
        raise ValueError(f"hf checkpoint {source!r} must look like hf://<owner>/<repo>/<file>")
    return repo_id, filename


def resolve_checkpoint(settings: Sam2Settings, s3: S3Settings | None = None) -> str | None:
    """A local file path for the configured checkpoint (None only when random weights are allowed)."""
    source = settings.checkpoint
    if source is None:
        if settings.allow_random_weights:
            logger.warning("SAM2 with RANDOM weights (allow_random_weights=true): for tests only")
            return None
        raise ValueError(NO_CHECKPOINT_MESSAGE)
    if is_s3_uri(source):
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        local = Path(settings.weights_cache_dir) / digest / Path(source).name
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_suffix(local.suffix + ".partial")
            partial.write_bytes(read_uri_bytes(source, s3))
            partial.replace(local)
        return str(local)
    if source.startswith("hf://"):
        repo_id, filename = _split_hf(source)
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(repo_id, filename)
        except Exception as exc:
            raise ValueError(f"SAM2 checkpoint {source} not found in the Hugging Face cache or hub: {exc}") from exc
    if not Path(source).is_file():
        raise ValueError(f"SAM2 checkpoint {source!r} does not exist")
    return source


def prompts_per_batch(crop_hw: tuple[int, int], image_hw: tuple[int, int], budget_bytes: int, requested: int) -> int:
    """Point prompts per AMG batch so the batch's masks fit ``budget_bytes`` (at least 1, at most ``requested``).

    SAM2 upsamples every mask of a batch to the crop's resolution and pads it to the image's before
    run-length encoding, so a batch costs about ``3 masks x (11 B x crop px + 4 B x image px)`` per prompt:
    ~350 MB per prompt on the full frame of a 3840x2160 image, ~210 MB on one of its first-layer crops.
    """
    crop_px, image_px = crop_hw[0] * crop_hw[1], image_hw[0] * image_hw[1]
    per_prompt = MASKS_PER_PROMPT * (CROP_BYTES_PER_MASK_PIXEL * crop_px + IMAGE_BYTES_PER_MASK_PIXEL * image_px)
    return max(1, min(requested, budget_bytes // per_prompt))


@functools.cache
def bounded_generator_class() -> type:
    """SAM2's AMG with per-crop prompt batches sized by :func:`prompts_per_batch` and compact RLE output.

    Built on first use because ``sam2`` is an optional import that only model workers need.
    """
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    class BoundedMaskGenerator(SAM2AutomaticMaskGenerator):
        def __init__(self, model: Any, *, mask_batch_bytes: int, **kwargs: Any) -> None:
            super().__init__(model, output_mode="uncompressed_rle", **kwargs)
            self.mask_batch_bytes = mask_batch_bytes
            self.max_points_per_batch = self.points_per_batch
            # (crop box xyxy in image px, prompts per batch) of each crop of the last generate() call.
            self.crops: list[tuple[tuple[int, int, int, int], int]] = []

        def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
            self.crops = []
            return super().generate(image)

        def _process_crop(
            self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int, orig_size: tuple[int, ...]
        ) -> Any:
            x0, y0, x1, y1 = crop_box
            self.points_per_batch = prompts_per_batch(
                (y1 - y0, x1 - x0), tuple(orig_size), self.mask_batch_bytes, self.max_points_per_batch
            )
            self.crops.append(((x0, y0, x1, y1), self.points_per_batch))
            return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)

        def _process_batch(self, *args: Any, **kwargs: Any) -> Any:
            data = super()._process_batch(*args, **kwargs)
            # Only the m2m refinement (inside the call above) reads the 256x256 float logits: 256 kB per
            # kept mask otherwise held until the end of the image. RLE counts as int32 arrays, not lists
            # of Python ints (4 vs ~36 bytes per run).
            del data["low_res_masks"]
            data["rles"] = [
                {"size": rle["size"], "counts": np.asarray(rle["counts"], dtype=np.int32)} for rle in data["rles"]
            ]
            return data

    return BoundedMaskGenerator


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


class Sam2Segmenter:
    def __init__(self, settings: Sam2Settings, s3: S3Settings | None = None) -> None:
        self.settings = settings
        self.s3 = s3
        self._generator: Any = None
        self._points_per_batch = settings.points_per_batch

    def setup(self) -> None:
        import torch
        from sam2.build_sam import build_sam2

        device = resolve_device(self.settings.device)
        checkpoint = resolve_checkpoint(self.settings, self.s3)
        overrides = []
        if self.settings.image_size != SAM2_NATIVE_IMAGE_SIZE:
            overrides.append(f"++model.image_size={self.settings.image_size}")
        if checkpoint is None:
            torch.manual_seed(0)  # random weights, but the same ones in every worker
        model = build_sam2(
            self.settings.model_cfg, ckpt_path=checkpoint, device=device, mode="eval", hydra_overrides_extra=overrides
        )
        self._generator = bounded_generator_class()(
            model,
            mask_batch_bytes=self.settings.mask_batch_mb * 1024 * 1024,
            points_per_side=self.settings.points_per_side,
            points_per_batch=self._points_per_batch,
            crop_n_layers=self.settings.crop_n_layers,
            crop_n_points_downscale_factor=self.settings.crop_n_points_downscale_factor,
            pred_iou_thresh=self.settings.pred_iou_thresh,
            stability_score_thresh=self.settings.stability_score_thresh,
            min_mask_region_area=self.settings.min_mask_region_area,
        )
        if self.settings.image_size != SAM2_NATIVE_IMAGE_SIZE:
            # SAM2ImagePredictor hard-codes the backbone feature sizes of a 1024 input.
            size = self.settings.image_size
            self._generator.predictor._bb_feat_sizes = [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]
        logger.info("SAM2 ready on %s (%s, checkpoint %s)", device, self.settings.model_cfg, checkpoint)

    @property
    def crops(self) -> list[tuple[tuple[int, int, int, int], int]]:
        """``(crop box xyxy in pixels of the image given, prompts per batch)`` of the last image's crops."""
        return list(self._generator.crops) if self._generator is not None else []

    def masks_batch(self, images: list[tuple[np.ndarray, int, int]]) -> list[MaskSet]:
        """AMG prompts one image at a time (its batching is over point prompts, ``points_per_batch``).

        Each image is ``(h, w, 3)`` uint8 at the resolution AMG should see (native, or ``max_side``), with
        the full-resolution ``(width, height)`` the masks are measured in.
        """
        return [self.masks(image, full_width, full_height) for image, full_width, full_height in images]

    def masks(self, image_rgb: np.ndarray, full_width: int, full_height: int) -> MaskSet:
        """Run AMG; on out-of-memory halve the prompt batch and retry instead of failing the image.

        Returns the masks as :class:`ColumnRuns` on the grid of ``image_rgb``.
        """
        import torch

        if self._generator is None:
            self.setup()
        while True:
            try:
                with torch.inference_mode():
                    proposals = self._generator.generate(image_rgb)
                break
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc) or self._points_per_batch <= MIN_POINTS_PER_BATCH:
                    raise
                self._points_per_batch //= 2
                self._generator.max_points_per_batch = self._points_per_batch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("SAM2 out of memory: retrying with points_per_batch=%d", self._points_per_batch)
        height, width = image_rgb.shape[:2]
        runs = ColumnRuns.from_rles([p["segmentation"] for p in proposals], height, width)
        logger.debug(
            "SAM2: %d masks on %dx%d in %d crops, %d kB of runs",
            runs.num_masks,
            width,
            height,
            len(self.crops),
            runs.nbytes // 1024,
        )
        return MaskSet(full_width=full_width, full_height=full_height, runs=runs)

"""Weight-free region proposals: Felzenszwalb-Huttenlocher graph segmentation (scikit-image).

It partitions the image into segments that follow colour edges: smooth backgrounds merge into a few
large segments while text, small objects and clutter split into many small ones, which is exactly
what the PS3 score rewards. No GPU and no weights, so it is the embedded default.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.stages.segmenters.masks import MaskSet


class ClassicalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(300.0, gt=0, description="higher = larger segments")
    sigma: float = Field(0.8, ge=0, description="Gaussian pre-smoothing")
    min_size: int = Field(20, ge=1, description="smallest segment, in working pixels")


class ClassicalSegmenter:
    def __init__(self, settings: ClassicalSettings) -> None:
        self.settings = settings

    def setup(self) -> None:
        from skimage.segmentation import felzenszwalb  # noqa: F401 - fail at setup, not mid-shard

    def masks_batch(self, images: list[tuple[np.ndarray, int, int]]) -> list[MaskSet]:
        return [self.masks(image, full_width, full_height) for image, full_width, full_height in images]

    def masks(self, image_rgb: np.ndarray, full_width: int, full_height: int) -> MaskSet:
        from skimage.segmentation import felzenszwalb

        labels = felzenszwalb(
            image_rgb, scale=self.settings.scale, sigma=self.settings.sigma, min_size=self.settings.min_size
        )
        return MaskSet(full_width=full_width, full_height=full_height, labels=labels.astype(np.int32))

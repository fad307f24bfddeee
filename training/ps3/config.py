"""Configuration of the PS3 model (spec sections 2.1-2.4): towers, scales, selection budget, heads.

The two SigLIP towers come either from config dicts (random weights: tests, debug runs, benchmarks)
or from a pretrained SigLIP checkpoint folder (``pretrained``, local path or ``s3://`` prefix), whose
own config then decides the tower shapes. The PS3 additions (selection modules, per-scale position
residuals) are always freshly initialised.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# SigLIP-SO400M/14 towers (google/siglip-so400m-patch14-384), used when paper_1p5k() gets no checkpoint.
SO400M_VISION: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
SO400M_TEXT: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": None,
    "eos_token_id": 1,
}


class PS3ModelConfig(BaseModel):
    """What a PS3 model is made of.

    ``scales`` run low to high; the first is the low-res pass and must give the same patch grid as the
    vision tower's position table (SigLIP-SO400M is configured at 384 px, whose 14-px grid is 27x27 like
    PS3's 378 px). ``max_select`` is the number of high-res patches per image in one selection round,
    split across the high-res scales by pixel share (see ``selection.split_budget``) unless
    ``select_per_scale`` gives the split (the reference's ``max_select_num_each_scale``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    vision: dict[str, Any] | None = Field(None, description="SiglipVisionConfig kwargs (random-weight towers)")
    text: dict[str, Any] | None = Field(None, description="SiglipTextConfig kwargs (random-weight towers)")
    pretrained: str | None = Field(None, description="SigLIP checkpoint folder (local or s3://) with both towers")
    scales: list[int]
    patch_size: int = Field(14, ge=1)
    select_layers: list[int]
    max_select: int = Field(ge=1)
    select_per_scale: list[int] | None = Field(None, description="patches per high-res scale in one round")
    conv_hidden: int = Field(512, ge=1)
    conv_blocks: int = Field(3, ge=0)
    embed_dim: int = Field(ge=1)
    logit_bias_init: float = -10.0
    logit_scale_init: float = math.log(10.0)

    @model_validator(mode="after")
    def _check(self) -> PS3ModelConfig:
        has_dicts = self.vision is not None and self.text is not None
        if has_dicts == (self.pretrained is not None) or (self.vision is None) != (self.text is None):
            raise ValueError("give either both `vision` and `text` tower configs, or `pretrained`, not both")
        if len(self.scales) < 2:
            raise ValueError(f"scales need a low-res scale and at least one high-res scale, got {self.scales}")
        if any(b <= a for a, b in zip(self.scales, self.scales[1:], strict=False)):
            raise ValueError(f"scales must increase, got {self.scales}")
        if any(s % self.patch_size for s in self.scales):
            raise ValueError(f"every scale must be a multiple of patch_size {self.patch_size}, got {self.scales}")
        if self.select_per_scale is not None and (
            len(self.select_per_scale) != len(self.scales) - 1
            or sum(self.select_per_scale) != self.max_select
            or min(self.select_per_scale) < 0
        ):
            raise ValueError(
                f"select_per_scale {self.select_per_scale} must give one count >= 0 per high-res scale "
                f"({len(self.scales) - 1}) summing to max_select {self.max_select}"
            )
        if not self.select_layers or min(self.select_layers) < 0:
            raise ValueError(f"select_layers must be non-empty layer indices, got {self.select_layers}")
        if has_dicts:
            from transformers import SiglipTextConfig, SiglipVisionConfig

            check_towers(self, SiglipVisionConfig(**self.vision), SiglipTextConfig(**self.text))
        return self

    @property
    def num_highres_scales(self) -> int:
        return len(self.scales) - 1

    @property
    def round_quotas(self) -> list[int]:
        """Patches per high-res scale in one full selection round (1.5K: [512, 2048]; 4K: [85, 341, 2134])."""
        from ps3_engine.training.ps3.selection import split_budget

        return list(self.select_per_scale) if self.select_per_scale else split_budget(self.max_select, self.scales[1:])

    @property
    def max_highres_tokens(self) -> int:
        """Every high-res patch of every scale (1.5K: 14,580; 4K: 87,480)."""
        return sum(g * g for g in self.grid_sizes[1:])

    @property
    def grid_sizes(self) -> list[int]:
        """Patch-grid side per scale (low-res first)."""
        return [s // self.patch_size for s in self.scales]

    @property
    def conv_input_size(self) -> int:
        """The conv branch sees the image at the third scale (1512 for 1.5K and 4K), else the largest."""
        return self.scales[2] if len(self.scales) > 2 else self.scales[-1]

    @classmethod
    def tiny(cls) -> PS3ModelConfig:
        """A few-thousand-parameter model for tests and the CPU debug recipe (grids 4, 8, 16)."""
        return cls(
            vision={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "image_size": 56,
                "patch_size": 14,
            },
            text={
                "vocab_size": 512,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 64,
                "pad_token_id": 0,
                "bos_token_id": 1,
                "eos_token_id": 1,
            },
            scales=[56, 112, 224],
            patch_size=14,
            select_layers=[0, 1, 2, 3],
            max_select=48,
            conv_hidden=16,
            conv_blocks=1,
            embed_dim=32,
        )

    @classmethod
    def paper_1p5k(cls, pretrained: str | None = None) -> PS3ModelConfig:
        """PS3-1.5K-SigLIP (spec 2.1-2.4): 378/756/1512, 2560 patches ([512, 2048]), SO400M towers.

        Without ``pretrained`` the SO400M towers get random weights (shape and throughput checks only).
        """
        towers: dict[str, Any] = (
            {"pretrained": pretrained} if pretrained else {"vision": SO400M_VISION, "text": SO400M_TEXT}
        )
        return cls(
            **towers,
            scales=[378, 756, 1512],
            patch_size=14,
            select_layers=[0, 9, 18, 26],
            max_select=2560,
            conv_hidden=512,
            conv_blocks=3,
            embed_dim=1152,
        )

    @classmethod
    def paper_4k(cls, pretrained: str | None = None) -> PS3ModelConfig:
        """PS3-4K-SigLIP (spec 2.1, 2.4): 378/756/1512/3780, 2560 patches a round ([85, 341, 2134]).

        The conv branch still sees 1512 px (``conv_input_size``), as in the reference config.
        """
        base = cls.paper_1p5k(pretrained).model_dump()
        return cls(**{**base, "scales": [378, 756, 1512, 3780]})


def check_towers(cfg: PS3ModelConfig, vision: Any, text: Any) -> None:
    """Cross-checks between the PS3 settings and the SigLIP tower configs.

    Raises:
        ValueError: the towers cannot run this PS3 configuration.
    """
    image_size, patch = _as_int(vision.image_size), _as_int(vision.patch_size)
    if patch != cfg.patch_size:
        raise ValueError(f"vision patch_size {patch} differs from the PS3 patch_size {cfg.patch_size}")
    if image_size // patch != cfg.scales[0] // cfg.patch_size:
        raise ValueError(
            f"the low-res scale {cfg.scales[0]} gives a {cfg.scales[0] // patch}-patch grid but the vision "
            f"tower's position table is {image_size // patch} patches wide (image_size {image_size})"
        )
    if vision.hidden_size != cfg.embed_dim:
        raise ValueError(f"embed_dim {cfg.embed_dim} must equal the vision hidden size {vision.hidden_size}")
    if text.projection_size != cfg.embed_dim:
        raise ValueError(f"embed_dim {cfg.embed_dim} must equal the text projection size {text.projection_size}")
    if max(cfg.select_layers) >= vision.num_hidden_layers:
        raise ValueError(f"select_layers {cfg.select_layers} exceed the {vision.num_hidden_layers} vision layers")
    if not vision.vision_use_head:
        raise ValueError("PS3 pools with the SigLIP attention-pool head: vision_use_head must be true")


def _as_int(value: int | list[int] | tuple[int, int]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"PS3 needs square images and patches, got {value}")
    return int(value[0])

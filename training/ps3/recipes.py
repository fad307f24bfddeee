"""PS3 pre-training recipes as code: a validated pydantic object per named recipe, overridable with ``key=value``.

``debug`` is a tiny random-weight model on CPU that trains in seconds (tests, smoke runs). The paper
recipes carry the reference's pre-training settings (spec section 4, ``train/scripts/ps3_*_siglip.sh``):
lr 5e-6, 1500 warmup iterations, cosine decay, AdamW (0.9, 0.95) with weight decay 3e-4, 25% global
captions, one 2560-patch selection round, fp16 autocast with a GradScaler (``--precision amp``),
gradient checkpointing on, no gradient clipping (the scripts pass no ``--grad-clip-norm``), and the
selection modules in the ordinary weight-decay groups (no ``--token_selection_lr``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ps3_engine.training.common.recipe import BaseRecipe, apply_overrides
from ps3_engine.training.ps3.config import PS3ModelConfig

SAMPLES_SEEN = 75_000_000  # 75 epochs of 1M resampled samples (spec Table 13)
NUM_GPUS = 128  # "16 nodes of 8xA100"


class PS3Recipe(BaseRecipe):
    model: PS3ModelConfig
    context_length: int = Field(64, ge=8)
    batch_size_per_worker: int = Field(4, ge=1)
    lr: float = Field(5e-6, gt=0)
    warmup_steps: int = Field(1500, ge=0)
    weight_decay: float = Field(3e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    # Used only with selection_lr: the reference then puts the selection modules in their own group
    # without decay; without it they decay like every other matrix.
    selection_weight_decay: float = Field(0.0, ge=0)
    global_caption_prob: float = Field(0.25, ge=0, le=1)
    prior_loss_weight: float = 1.0
    posterior_loss_weight: float = 1.0
    balance_sources: bool = True

    @property
    def image_size(self) -> int:
        return max(self.model.scales)

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer folder: ``tokenizer``, else the pretrained SigLIP folder (which holds ``spiece.model``).

        Raises:
            ValueError: neither is set (random-weight towers need an explicit tokenizer).
        """
        path = self.tokenizer or self.model.pretrained
        if path is None:
            raise ValueError("the recipe names no tokenizer and the model has no pretrained folder to take one from")
        return path


def _debug() -> PS3Recipe:
    return PS3Recipe(
        name="debug",
        model=PS3ModelConfig.tiny(),
        num_workers=2,
        cpus_per_worker=0.5,
        batch_size_per_worker=4,
        max_steps=6,
        lr=1e-3,
        warmup_steps=2,
        # Differs from the paper: a tiny random model at lr 1e-3 needs the clip to train steadily.
        grad_clip_norm=1.0,
        checkpoint_every=3,
        log_every=1,
        context_length=32,
    )


def _paper(name: str, model: PS3ModelConfig, global_batch: int) -> PS3Recipe:
    return PS3Recipe(
        name=name,
        model=model,
        num_workers=NUM_GPUS,
        use_gpu=True,
        precision="fp16",  # the reference's --precision amp; bf16 needs no scaler and is an override away
        grad_checkpointing=True,
        batch_size_per_worker=global_batch // NUM_GPUS,
        max_steps=-(-SAMPLES_SEEN // global_batch),
        checkpoint_every=500,
        log_every=20,
    )


def _paper_1p5k() -> PS3Recipe:
    """Global batch 8192 (64 per GPU on 128 GPUs), about 9.2k steps."""
    model = PS3ModelConfig.paper_1p5k(pretrained="s3://my-bucket/models/siglip-so400m-patch14-384")
    return _paper("paper-1.5k", model, 8192)


def _paper_4k() -> PS3Recipe:
    """Scales 378/756/1512/3780, global batch 4096 (32 per GPU on 128 GPUs), about 18.3k steps."""
    model = PS3ModelConfig.paper_4k(pretrained="s3://my-bucket/models/siglip-so400m-patch14-384")
    return _paper("paper-4k", model, 4096)


RECIPES = {"debug": _debug, "paper-1.5k": _paper_1p5k, "paper-4k": _paper_4k}


def load_recipe(name: str, overrides: dict[str, Any] | None = None) -> PS3Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
    return PS3Recipe.model_validate(apply_overrides(RECIPES[name]().model_dump(mode="json"), overrides))

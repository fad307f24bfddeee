"""Training recipes as code: a validated pydantic object per named recipe, overridable with ``key=value``.

``debug`` is a tiny random-weight model on CPU that trains in seconds (tests, smoke runs). The paper
recipes carry the PS3 pre-training settings (spec section 4): lr 5e-6, 1500 warmup iterations, cosine
decay, AdamW (0.9, 0.95) with weight decay 3e-4, 25% global captions, one 2560-patch selection round.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ps3_engine.training.ps3.config import PS3ModelConfig


class PS3Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: PS3ModelConfig
    tokenizer: str | None = Field(None, description="tokenizer folder; None = the model's pretrained path")
    context_length: int = Field(64, ge=8)
    num_workers: int = Field(1, ge=1)
    # CPUs reserved per training worker. The rest of the cluster's CPUs run the Ray Data reading and
    # decoding ahead of the workers; on a small machine reserving every CPU for training starves it.
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size_per_worker: int = Field(4, ge=1)
    max_steps: int = Field(10, ge=1)
    lr: float = Field(5e-6, gt=0)
    selection_lr: float | None = Field(None, gt=0, description="separate lr for the selection modules")
    warmup_steps: int = Field(1500, ge=0)
    weight_decay: float = Field(3e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip_norm: float | None = Field(1.0, gt=0)
    global_caption_prob: float = Field(0.25, ge=0, le=1)
    prior_loss_weight: float = 1.0
    posterior_loss_weight: float = 1.0
    balance_sources: bool = True
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    num_checkpoints_to_keep: int = Field(3, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _precision_needs_gpu(self) -> PS3Recipe:
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision {self.precision} needs use_gpu=true (CPU training runs in fp32)")
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("strategy fsdp needs use_gpu=true")
        return self

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
        checkpoint_every=3,
        log_every=1,
        context_length=32,
    )


def _paper_1p5k() -> PS3Recipe:
    return PS3Recipe(
        name="paper-1.5k",
        model=PS3ModelConfig.paper_1p5k(pretrained="s3://my-bucket/models/siglip-so400m-patch14-384"),
        num_workers=128,
        use_gpu=True,
        precision="bf16",
        batch_size_per_worker=64,  # global batch 8192 on 128 GPUs (spec Table 13)
        max_steps=9200,  # 75M samples / 8192
        lr=5e-6,
        warmup_steps=1500,
        checkpoint_every=500,
        log_every=20,
    )


RECIPES = {"debug": _debug, "paper-1.5k": _paper_1p5k}


def load_recipe(name: str, overrides: dict[str, Any] | None = None) -> PS3Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
    base = RECIPES[name]().model_dump(mode="json")
    for dotted, value in (overrides or {}).items():
        node = base
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return PS3Recipe.model_validate(base)

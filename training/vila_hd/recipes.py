"""VILA-HD training recipes as code: one validated pydantic object per named recipe, overridable with ``key=value``.

Stage-wise, as the paper's NVILA-based recipe (spec 5.3):

* ``align``: projector (and high-res position embeddings) only, lr 1e-3: the vision tokens learn to
  speak the LLM's language while PS3 and the LLM stay frozen.
* ``full``: everything, starting from the ``align`` checkpoint (``init_from``), with the paper's
  10,240 high-res patches per image, the LLM at a lower learning rate and the selection modules
  (top-down head + PS3 selector) at their own one.
* ``selection``: top-down head and PS3 selector only, on selection-only data (the paper's separate
  patch-selection stage).
* ``debug``: the tiny model on CPU, 2 workers, a few steps (tests, smoke runs).

The production paths (``s3://my-bucket/...``) are placeholders to override with ``--set``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ps3_engine.training.common.recipe import BaseRecipe, apply_overrides
from ps3_engine.training.vila_hd.config import COMPONENTS, VilaHDConfig

Component = Literal["projector", "top_down_head", "selector", "vision", "llm"]
ALL_COMPONENTS: list[Component] = list(COMPONENTS)  # type: ignore[arg-type]
SampleKindName = Literal["selection", "grounded_qa"]


class VilaHDRecipe(BaseRecipe):
    model: VilaHDConfig
    trainable: list[Component] = Field(min_length=1)
    init_from: str | None = Field(None, description="checkpoint folder of an earlier stage (when not resuming)")
    context_length: int = Field(512, ge=16)
    lr: float = Field(gt=0, description="projector and PS3 encoder")
    llm_lr: float | None = Field(None, gt=0, description="LLM (default: lr)")
    # VILA trains with the HF Trainer, whose max_grad_norm defaults to 1.0.
    grad_clip_norm: float | None = Field(1.0, gt=0)
    grounded_kinds: list[SampleKindName] = Field(default_factory=lambda: ["selection", "grounded_qa"], min_length=1)
    max_regions_per_image: int | None = Field(None, ge=1)

    @property
    def image_size(self) -> int:
        return max(self.model.ps3.scales)

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.model.llm_pretrained


def _debug() -> VilaHDRecipe:
    return VilaHDRecipe(
        name="debug",
        model=VilaHDConfig.tiny(),
        trainable=list(ALL_COMPONENTS),
        context_length=128,
        num_workers=2,
        cpus_per_worker=0.5,
        batch_size_per_worker=2,
        max_steps=4,
        lr=1e-3,
        llm_lr=1e-4,
        selection_lr=3e-3,
        warmup_steps=1,
        checkpoint_every=2,
        log_every=1,
    )


def _production(name: str, **fields: Any) -> VilaHDRecipe:
    return VilaHDRecipe(
        name=name,
        model=VilaHDConfig.production(
            llm_path="s3://my-bucket/models/Qwen2-7B-Instruct",
            ps3_weights="s3://my-bucket/training/paper-1.5k/checkpoint_final",
        ),
        num_workers=128,
        use_gpu=True,
        strategy="fsdp",
        precision="bf16",
        grad_checkpointing=True,
        context_length=4096,
        warmup_steps=100,
        checkpoint_every=500,
        log_every=20,
        **fields,
    )


def _align() -> VilaHDRecipe:
    return _production("align", trainable=["projector"], lr=1e-3, batch_size_per_worker=4, max_steps=2000)


def _full() -> VilaHDRecipe:
    return _production(
        "full",
        trainable=list(ALL_COMPONENTS),
        init_from="s3://my-bucket/training/vila-hd-align/checkpoint_final",
        lr=2e-5,
        llm_lr=2e-5,
        selection_lr=1e-4,
        weight_decay=0.0,
        batch_size_per_worker=1,
        max_steps=10000,
    )


def _selection() -> VilaHDRecipe:
    return _production(
        "selection",
        trainable=["top_down_head", "selector"],
        init_from="s3://my-bucket/training/vila-hd-full/checkpoint_final",
        grounded_kinds=["selection"],
        lr=1e-4,
        batch_size_per_worker=4,
        max_steps=2000,
    )


RECIPES = {"debug": _debug, "align": _align, "full": _full, "selection": _selection}


def load_recipe(name: str, overrides: dict[str, Any] | None = None) -> VilaHDRecipe:
    """The named recipe with dotted ``overrides`` (``model.num_select=2560``) applied and validated.

    Raises:
        ValueError: unknown recipe or an invalid result.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
    return VilaHDRecipe.model_validate(apply_overrides(RECIPES[name]().model_dump(mode="json"), overrides))

"""The recipe fields both training jobs share, the ``key=value`` overrides and the learning-rate schedule.

Each job's recipe (``PS3Recipe``, ``VilaHDRecipe``) extends ``BaseRecipe`` with its model and data
fields and may restate a default where the job's reference differs (with a comment saying so).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BaseRecipe(BaseModel):
    """Workers, precision, optimiser, schedule and checkpointing of one training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tokenizer: str | None = Field(None, description="tokenizer folder; None = the model's pretrained folder")
    num_workers: int = Field(1, ge=1)
    # CPUs reserved per training worker. The rest of the cluster's CPUs run the Ray Data reading and
    # decoding ahead of the workers; on a small machine reserving every CPU for training starves it.
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fp16 runs with a GradScaler (dynamic loss scaling); bf16 needs none.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_checkpointing: bool = False
    batch_size_per_worker: int = Field(1, ge=1)
    max_steps: int = Field(10, ge=1)
    lr: float = Field(gt=0)
    selection_lr: float | None = Field(None, gt=0, description="separate lr for the selection modules")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip_norm: float | None = Field(None, gt=0, description="max global grad norm; None = no clipping")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    num_checkpoints_to_keep: int = Field(3, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_device(self) -> BaseRecipe:
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision {self.precision} needs use_gpu=true (CPU training runs in fp32)")
        if self.strategy == "fsdp" and not self.use_gpu:
            raise ValueError("strategy fsdp needs use_gpu=true")
        return self


def apply_overrides(recipe: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``recipe`` (a ``model_dump``) with dotted ``key=value`` overrides set in place; returns it."""
    for dotted, value in (overrides or {}).items():
        node = recipe
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return recipe


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``max_steps`` (a multiplier of the base lr)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_and_scaler(precision: str) -> tuple[Any, Any]:
    """The autocast dtype (None for fp32) and, for fp16, a GradScaler, as the reference's ``--precision amp``."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return dtype, scaler

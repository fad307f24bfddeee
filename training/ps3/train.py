"""``ps3-engine train ps3``: PS3 contrastive pre-training on corpus shards with Ray Train.

The launcher validates the corpus (manifest, schema version, readable shards) before any worker or
GPU is requested, then runs a ``TorchTrainer`` (DDP, or FSDP on GPUs) whose workers stream their
shard of the corpus from Ray Data. Checkpoints (model, optimizer, scheduler, step) go to the storage
path (local or S3) every ``checkpoint_every`` steps; launching again with the same run name and storage
path resumes from the latest one. A non-finite loss stops the run with an error instead of training on.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ps3_engine.infra.storage import S3Settings
from ps3_engine.training.common.launcher import LaunchRefused, LaunchResult, NonFiniteLoss
from ps3_engine.training.common.recipe import autocast_and_scaler, lr_factor
from ps3_engine.training.ps3.recipes import PS3Recipe

__all__ = ["CorpusRejected", "LaunchResult", "NonFiniteLoss", "TrainState", "launch", "lr_at", "train_step"]

logger = logging.getLogger(__name__)

# Parameters that decide which patches are selected; they may get their own learning rate (spec 3.3).
SELECTION_PARAM_PREFIXES = (
    "prompt_proj",
    "selection_feature_proj",
    "prior_prompt",
    "highres_selection_feature_module",
    "prompt_proj_for_highres",
    "conv_branch",
)


class CorpusRejected(LaunchRefused):
    """The corpus failed the pre-launch check; nothing was started."""


def lr_at(step: int, recipe: PS3Recipe) -> float:
    """Linear warmup to 1 then cosine decay to 0 over ``max_steps`` (a multiplier of the base lr)."""
    return lr_factor(step, recipe.warmup_steps, recipe.max_steps)


def _param_groups(model: Any, recipe: PS3Recipe) -> list[dict[str, Any]]:
    """AdamW groups as the reference's ``main.py``: gains, biases and logit scale/bias without decay.

    With ``selection_lr`` the selection modules get their own group (that lr, ``selection_weight_decay``);
    without it they decay like every other matrix, as in the paper scripts (no ``--token_selection_lr``).
    """
    selection, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = name.removeprefix("module.")
        if recipe.selection_lr is not None and any(p.startswith(SELECTION_PARAM_PREFIXES) for p in bare.split(".")):
            selection.append(param)
        elif param.ndim < 2 or "norm" in bare or "bias" in bare or "logit" in bare:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay, "lr": recipe.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": recipe.lr},
        {"params": selection, "weight_decay": recipe.selection_weight_decay, "lr": recipe.selection_lr},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class TrainState:
    """Everything a step needs and a checkpoint holds (the lr comes from the step via ``lr_at``)."""

    model: Any
    optimizer: Any
    base_lrs: list[float]
    recipe: PS3Recipe
    step: int = 0
    scaler: Any = None

    @classmethod
    def create(cls, model: Any, recipe: PS3Recipe) -> TrainState:
        import torch

        optimizer = torch.optim.AdamW(_param_groups(model, recipe), betas=recipe.betas)
        _, scaler = autocast_and_scaler(recipe.precision)
        return cls(model, optimizer, [g["lr"] for g in optimizer.param_groups], recipe, 0, scaler)

    def state_dict(self) -> dict[str, Any]:
        unwrapped = self.model.module if hasattr(self.model, "module") else self.model
        return {
            "model": unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrapped = self.model.module if hasattr(self.model, "module") else self.model
        unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def train_step(state: TrainState, batch: dict[str, Any], device: Any) -> dict[str, float]:
    """One optimisation step on ``batch``; raises :class:`NonFiniteLoss` instead of stepping on NaN/inf."""
    import torch

    from ps3_engine.training.ps3.losses import ps3_loss

    recipe = state.recipe
    for group, base in zip(state.optimizer.param_groups, state.base_lrs, strict=True):
        group["lr"] = base * lr_at(state.step, recipe)
    autocast_dtype, _ = autocast_and_scaler(recipe.precision)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = state.model(
            images=batch["pixel_values"].to(device),
            input_ids=batch["input_ids"].to(device),
            gt_maps=batch["gt_map"].to(device).float(),
            is_global=batch["is_global"].to(device).bool(),
        )
    losses = ps3_loss(outputs, prior_weight=recipe.prior_loss_weight, posterior_weight=recipe.posterior_loss_weight)
    loss = losses["total"]
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()} at step {state.step}; stopping (last checkpoint is kept)")
    state.optimizer.zero_grad(set_to_none=True)
    scaler = state.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    if recipe.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), recipe.grad_clip_norm)
    if scaler is not None:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    state.step += 1
    return {k: float(v.detach()) for k, v in losses.items()} | {"lr": state.optimizer.param_groups[0]["lr"]}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from ps3_engine.training.ps3.model import PS3CLIP

    recipe = PS3Recipe.model_validate(config["recipe"])
    torch.manual_seed(recipe.seed)
    model = PS3CLIP.from_config(recipe.model)
    model.set_grad_checkpointing(recipe.grad_checkpointing)
    parallel = "fsdp" if recipe.strategy == "fsdp" else "ddp"
    state = TrainState.create(ray.train.torch.prepare_model(model, parallel_strategy=parallel), recipe)
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.load_state_dict(torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False))
        resumed_from = state.step
        logger.info("resumed from step %d", state.step)
    from ps3_engine.training.common.loop import run_steps

    run_steps(
        lambda batch: train_step(state, batch, ray.train.torch.get_device()),
        lambda: state.step,
        lambda metrics: _report_with_checkpoint(state, metrics),
        recipe,
        {"resumed_from_step": resumed_from},
        config.get("skip_counter"),
    )


def _report_with_checkpoint(state: TrainState, metrics: dict) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        # Every rank reports; only rank 0 writes the (replicated) DDP state.
        if ray.train.get_context().get_world_rank() == 0:
            torch.save(state.state_dict(), Path(folder) / "state.pt")
            (Path(folder) / "recipe.json").write_text(json.dumps(state.recipe.model_dump(mode="json"), indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def launch(
    corpus: str,
    recipe: PS3Recipe,
    storage_path: str,
    run_name: str,
    s3: S3Settings | None = None,
    split: str = "train",
) -> LaunchResult:
    """Check the corpus, then train on a Ray cluster (joins RAY_ADDRESS or starts a local one).

    Raises:
        CorpusRejected: the corpus failed its check (nothing was started).
        LaunchRefused: the same run is already training, or its checkpoints cannot be resumed.
    """
    from ps3_engine.infra.ray_cluster import ensure_ray
    from ps3_engine.training.common.launcher import check_resumable, claim_run, fit, release
    from ps3_engine.training.ps3.data import CorpusSampleTransform, check_corpus, training_dataset
    from ps3_engine.training.ps3.tokenizer import load_text_tokenizer

    check = check_corpus(corpus, s3)
    if not check.ok:
        raise CorpusRejected(f"corpus {corpus} cannot be trained on: " + "; ".join(check.problems))
    logger.info("corpus %s: %s", corpus, check.counts)
    # Load the tokenizer here first: a folder this install cannot open fails before any worker starts.
    load_text_tokenizer(recipe.tokenizer_path, s3)
    check_resumable(storage_path, run_name, s3)
    ensure_ray(None)
    guard, counter = claim_run(storage_path, run_name)
    try:
        transform = CorpusSampleTransform(
            image_size=recipe.image_size,
            tokenizer_path=recipe.tokenizer_path,
            context_length=recipe.context_length,
            global_caption_prob=recipe.global_caption_prob,
            seed=recipe.seed,
            s3=s3,
            skip_counter=counter,
        )
        # epoch=None: every pass over the dataset draws new boxes, captions, crops and order.
        dataset = training_dataset(
            corpus, split, transform, seed=recipe.seed, balance_sources=recipe.balance_sources, epoch=None, s3=s3
        )
        dataset = dataset.drop_columns(["image_id", "source"])
        return fit(train_loop_per_worker, {}, recipe, dataset, storage_path, run_name, s3, counter)
    finally:
        release(guard)

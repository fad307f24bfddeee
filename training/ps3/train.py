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
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ps3_engine.infra.storage import S3Settings
from ps3_engine.training.ps3.recipes import PS3Recipe

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


class CorpusRejected(ValueError):
    """The corpus failed the pre-launch check; nothing was started."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


@dataclass(frozen=True)
class LaunchResult:
    run_name: str
    storage_path: str
    steps: int
    metrics: dict[str, Any]
    checkpoint_path: str | None


def lr_at(step: int, recipe: PS3Recipe) -> float:
    """Linear warmup to 1 then cosine decay to 0 over ``max_steps`` (a multiplier of the base lr)."""
    if recipe.warmup_steps and step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    span = max(1, recipe.max_steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: Any, recipe: PS3Recipe) -> list[dict[str, Any]]:
    selection, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = name.removeprefix("module.")
        if any(part.startswith(SELECTION_PARAM_PREFIXES) for part in bare.split(".")):
            selection.append(param)
        elif param.ndim < 2 or "norm" in bare or "bias" in bare or "logit" in bare:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay, "lr": recipe.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": recipe.lr},
    ]
    if selection:
        groups.append({"params": selection, "weight_decay": 0.0, "lr": recipe.selection_lr or recipe.lr})
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
        scaler = torch.amp.GradScaler("cuda") if recipe.precision == "fp16" else None
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
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.precision)
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
    parallel = "fsdp" if recipe.strategy == "fsdp" else "ddp"
    state = TrainState.create(ray.train.torch.prepare_model(model, parallel_strategy=parallel), recipe)
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.load_state_dict(torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False))
        resumed_from = state.step
        logger.info("resumed from step %d", state.step)
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    began, samples = time.perf_counter(), 0
    while state.step < recipe.max_steps:
        steps_this_pass = 0
        for batch in shard.iter_torch_batches(batch_size=recipe.batch_size_per_worker, drop_last=True):
            if state.step >= recipe.max_steps:
                break
            steps_this_pass += 1
            losses = train_step(state, batch, device)
            samples += batch["pixel_values"].shape[0]
            metrics = {
                "step": state.step,
                "resumed_from_step": resumed_from,
                **losses,
                "samples_per_s_per_worker": samples / (time.perf_counter() - began),
            }
            if state.step % recipe.checkpoint_every == 0 or state.step == recipe.max_steps:
                _report_with_checkpoint(state, metrics)
            elif state.step % recipe.log_every == 0:
                ray.train.report(metrics)
        if steps_this_pass == 0 and state.step < recipe.max_steps:
            raise ValueError(
                f"this worker's share of the corpus holds fewer than batch_size_per_worker="
                f"{recipe.batch_size_per_worker} samples: use a smaller batch or fewer workers"
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
    """Check the corpus, then train on a Ray cluster (joins RAY_ADDRESS or starts a local one)."""
    from ps3_engine.training.ps3.data import CorpusSampleTransform, check_corpus, training_dataset
    from ps3_engine.training.ps3.tokenizer import load_text_tokenizer

    check = check_corpus(corpus, s3)
    if not check.ok:
        raise CorpusRejected(f"corpus {corpus} cannot be trained on: " + "; ".join(check.problems))
    logger.info("corpus %s: %s", corpus, check.counts)

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from ps3_engine.pipeline.executor import ensure_ray

    # Load the tokenizer here first: a folder this install cannot open fails before any worker starts.
    load_text_tokenizer(recipe.tokenizer_path, s3)
    ensure_ray(None)
    transform = CorpusSampleTransform(
        image_size=recipe.image_size,
        tokenizer_path=recipe.tokenizer_path,
        context_length=recipe.context_length,
        global_caption_prob=recipe.global_caption_prob,
        seed=recipe.seed,
        s3=s3,
    )
    # epoch=None: every pass over the dataset draws new boxes, captions, crops and order.
    dataset = training_dataset(
        corpus, split, transform, seed=recipe.seed, balance_sources=recipe.balance_sources, epoch=None, s3=s3
    )
    dataset = dataset.drop_columns(["image_id", "source"])
    path, filesystem = _storage(storage_path, s3)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe.model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(
            num_workers=recipe.num_workers,
            use_gpu=recipe.use_gpu,
            resources_per_worker={"CPU": recipe.cpus_per_worker, **({"GPU": 1} if recipe.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.num_checkpoints_to_keep),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    return LaunchResult(
        run_name=run_name,
        storage_path=storage_path,
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )


def _storage(storage_path: str, s3: S3Settings | None) -> tuple[str, Any]:
    """Ray Train writes checkpoints through pyarrow: an S3 path goes with our S3 filesystem (endpoint, retries)."""
    if not storage_path.startswith("s3://"):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return str(Path(storage_path).resolve()), None
    from ps3_engine.infra.storage import resolve_filesystem

    filesystem, path = resolve_filesystem(storage_path, s3)
    return path, filesystem

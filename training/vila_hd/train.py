"""``ps3-engine train vila-hd``: VILA-HD supervised tuning with Ray Train, mirroring ``training.ps3.train``.

The launcher checks the data (an SFT dataset written by ``write_sft_dataset``, or a packed corpus that
is turned into grounded samples on the fly) before any worker or GPU is requested, then runs a
``TorchTrainer`` whose workers stream their share from Ray Data. Checkpoints (``state.pt`` with model,
optimizer and step; ``recipe.json``; the tokenizer) go to the storage path (local or S3) every
``checkpoint_every`` steps; launching again with the same run name and storage path resumes from the
latest (Ray Train restores it). A new stage starts from an earlier stage's checkpoint with
``init_from``. A non-finite loss stops the run.

    launch("s3://bucket/runs/r1", load_recipe("debug"), "s3://bucket/training", "vila-hd-debug")
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.training.common.launcher import LaunchRefused, LaunchResult, NonFiniteLoss
from ps3_engine.training.common.recipe import autocast_and_scaler, lr_factor
from ps3_engine.training.vila_hd.recipes import VilaHDRecipe
from ps3_engine.training.vila_hd.tokenizer import load_chat_tokenizer

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


__all__ = ["DataRejected", "LaunchResult", "NonFiniteLoss", "VilaHDTrainer", "launch", "lr_factor", "read_state"]


class DataRejected(LaunchRefused):
    """The training data failed the pre-launch check; nothing was started."""


def bare_name(name: str) -> str:
    """A parameter name without DDP / FSDP / checkpoint wrapper prefixes."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_groups(model: Any, recipe: VilaHDRecipe, component_of: dict[str, str]) -> list[dict[str, Any]]:
    """AdamW groups: selection modules (no decay), LLM and the rest (decay / no decay), by bare parameter name."""
    lrs = {"llm": recipe.llm_lr or recipe.lr, "selection": recipe.selection_lr or recipe.lr, "other": recipe.lr}
    buckets: dict[tuple[str, bool], list[Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of[bare_name(name)]
        kind = "selection" if component in ("top_down_head", "selector") else "llm" if component == "llm" else "other"
        decay = kind != "selection" and param.ndim >= 2 and "norm" not in name
        buckets.setdefault((kind, decay), []).append(param)
    return [
        {"params": params, "lr": lrs[kind], "weight_decay": recipe.weight_decay if decay else 0.0}
        for (kind, decay), params in buckets.items()
    ]


class VilaHDTrainer:
    """Optimiser, schedule and one ``train_step``; the model may be wrapped by DDP or FSDP.

    Args:
        model: the (possibly wrapped) ``VilaHD``.
        recipe: learning rates, schedule, precision and clipping.
        component_of: bare parameter name -> component (``VilaHD.component_of``, taken before wrapping).
        device: where batches go.
    """

    def __init__(self, model: Any, recipe: VilaHDRecipe, component_of: dict[str, str], device: Any) -> None:
        import torch

        self.model, self.recipe, self.device = model, recipe, device
        self.optimizer = torch.optim.AdamW(param_groups(model, recipe, component_of), betas=recipe.betas)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.autocast_dtype, self.scaler = autocast_and_scaler(recipe.precision)
        self.step = 0

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimiser step on ``batch`` (the ``SFTSampleTransform`` columns as tensors).

        Raises:
            NonFiniteLoss: the loss is NaN or infinite (nothing is updated).
        """
        import torch

        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * lr_factor(self.step, self.recipe.warmup_steps, self.recipe.max_steps)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self.model(
                images=batch["pixel_values"].to(self.device),
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                labels=batch["labels"].to(self.device),
                evidence_maps=batch["evidence_map"].to(self.device).float(),
            )
        if not torch.isfinite(out.loss):
            raise NonFiniteLoss(f"loss is {out.loss.item()} at step {self.step}; stopping (last checkpoint is kept)")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            out.loss.backward()
        if self.recipe.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.recipe.grad_clip_norm
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        return {
            "step": self.step,
            "loss": float(out.loss.detach()),
            "lm_loss": float(out.lm_loss.detach()),
            "selection_loss": float(out.selection_loss.detach()),
            "vision_tokens": sum(out.vision.num_vision_tokens) / len(out.vision.num_vision_tokens),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) model and optimiser state; a collective call under DDP/FSDP (every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state, "step": self.step}

    def load_optimizer(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: a parameter that never had a gradient (e.g. the bottom-up prior in top-down mode) has no state
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        self.step = int(state["step"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from ps3_engine.training.vila_hd.model import VilaHD

    recipe = VilaHDRecipe.model_validate(config["recipe"])
    torch.manual_seed(recipe.seed)
    tokenizer = load_chat_tokenizer(config["tokenizer"])
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
    elif recipe.init_from:
        state = read_state(recipe.init_from)
        state = {"model": state["model"]}  # weights only: a new stage gets a new optimiser and step 0
    model = VilaHD.from_config(recipe.model, tokenizer, load_weights=state is None)
    if state is not None:
        model.load_state_dict(state["model"])
    model.set_trainable(recipe.trainable)
    model.set_grad_checkpointing(recipe.grad_checkpointing)
    component_of = model.component_of()
    kwargs = {"use_orig_params": True} if recipe.strategy == "fsdp" else {"find_unused_parameters": True}
    model = ray.train.torch.prepare_model(model, parallel_strategy=recipe.strategy, parallel_strategy_kwargs=kwargs)
    trainer = VilaHDTrainer(model, recipe, component_of, ray.train.torch.get_device())
    resumed_from = 0
    if state is not None and "optimizer" in state:
        trainer.load_optimizer(state)
        resumed_from = trainer.step
        logger.info("resumed from step %d", trainer.step)
    from ps3_engine.training.common.loop import run_steps

    run_steps(
        trainer.train_step,
        lambda: trainer.step,
        lambda metrics: _report_with_checkpoint(trainer, recipe, tokenizer, metrics),
        recipe,
        {"resumed_from_step": resumed_from},
        config.get("skip_counter"),
    )


def _report_with_checkpoint(trainer: VilaHDTrainer, recipe: VilaHDRecipe, tokenizer: Any, metrics: dict) -> None:
    import ray.train
    import torch

    state = trainer.state_dict()  # collective: every rank takes part, rank 0 writes
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            torch.save(state, Path(folder) / "state.pt")
            (Path(folder) / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
            tokenizer.save_pretrained(Path(folder) / "tokenizer")
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


# ---- checkpoints and tokenizers ----------------------------------------------------------------
def read_state(checkpoint_uri: str, s3: S3Settings | None = None) -> dict[str, Any]:
    """``state.pt`` of a checkpoint folder (local or ``s3://``)."""
    import torch

    data = Storage(checkpoint_uri, s3).read_bytes("state.pt")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def ensure_tokenizer(recipe: VilaHDRecipe) -> VilaHDRecipe:
    """The recipe with a tokenizer: its own, the LLM's folder, or (tiny LLM) the tiny one built in a local cache."""
    if recipe.tokenizer_path is not None:
        return recipe
    from ps3_engine.training.vila_hd.tiny_tokenizer import build_tiny_chat_tokenizer

    cache = Path(os.environ.get("PS3_CACHE", "~/.cache/ps3-engine")).expanduser() / "vila-hd-tiny-tokenizer"
    return recipe.model_copy(update={"tokenizer": str(build_tiny_chat_tokenizer(cache))})


# ---- the launcher --------------------------------------------------------------------------------
def launch(
    data: str,
    recipe: VilaHDRecipe,
    storage_path: str,
    run_name: str,
    s3: S3Settings | None = None,
    split: str = "train",
) -> LaunchResult:
    """Check the data, then tune on a Ray cluster (joins RAY_ADDRESS or starts a local one).

    Raises:
        DataRejected: the data is missing or malformed (nothing was started).
        LaunchRefused: the same run is already training, or its checkpoints cannot be resumed.
    """
    from ps3_engine.infra.ray_cluster import ensure_ray
    from ps3_engine.training.common.launcher import check_resumable, claim_run, fit, release
    from ps3_engine.training.vila_hd.data import GroundedSampleMaker, SFTSampleTransform
    from ps3_engine.training.vila_hd.sft_dataset import check_training_data, training_rows

    kind, check = check_training_data(data, s3)
    if not check.ok:
        raise DataRejected(f"data {data} cannot be trained on: " + "; ".join(check.problems))
    logger.info("%s data %s: %s", kind, data, check.counts)
    recipe = ensure_tokenizer(recipe)
    assert recipe.tokenizer_path is not None
    check_resumable(storage_path, run_name, s3)
    ensure_ray(None)
    guard, counter = claim_run(storage_path, run_name)
    try:
        maker = GroundedSampleMaker(
            kinds=tuple(recipe.grounded_kinds), max_regions_per_image=recipe.max_regions_per_image, skip_counter=counter
        )
        transform = SFTSampleTransform(
            image_size=recipe.image_size,
            tokenizer_path=recipe.tokenizer_path,
            context_length=recipe.context_length,
            s3=s3,
            skip_counter=counter,
        )
        rows = training_rows(data, kind, split, maker, s3).random_shuffle(seed=recipe.seed)
        dataset = rows.flat_map(transform.samples)
        loop_config = {"tokenizer": recipe.tokenizer_path}
        return fit(train_loop_per_worker, loop_config, recipe, dataset, storage_path, run_name, s3, counter)
    finally:
        release(guard)

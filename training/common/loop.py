"""The worker-side training loop both jobs share (Ray Train workers)."""

from __future__ import annotations

import time
from typing import Any


def run_steps(
    step: Any, current_step: Any, checkpoint: Any, recipe: Any, extra: dict[str, Any], skip_counter: str | None
) -> None:
    """The worker loop both jobs share: iterate this worker's data shard until ``max_steps``.

    Args:
        step: ``batch -> metrics`` (one optimiser step).
        current_step: ``() -> int``, the step count after the last ``step``.
        checkpoint: ``metrics -> None``, report with a checkpoint (every ``checkpoint_every`` and at the end).
        recipe: a ``BaseRecipe``.
        extra: metrics added to every report.
        skip_counter: the launch's skip-counter name; its totals join every report.

    Raises:
        ValueError: this worker's share of the data cannot fill one batch.
    """
    import ray.train

    from ps3_engine.training.common.skips import counter_totals

    shard = ray.train.get_dataset_shard("train")
    began, samples = time.perf_counter(), 0
    while current_step() < recipe.max_steps:
        steps_this_pass = 0
        for batch in shard.iter_torch_batches(batch_size=recipe.batch_size_per_worker, drop_last=True):
            if current_step() >= recipe.max_steps:
                break
            losses = step(batch)
            steps_this_pass += 1
            samples += batch["pixel_values"].shape[0]
            done = current_step()
            if done % recipe.checkpoint_every and done % recipe.log_every and done != recipe.max_steps:
                continue
            metrics = {
                "step": done,
                **extra,
                **losses,
                "samples_per_s_per_worker": samples / (time.perf_counter() - began),
                **counter_totals(skip_counter),
            }
            if done % recipe.checkpoint_every == 0 or done == recipe.max_steps:
                checkpoint(metrics)
            else:
                ray.train.report(metrics)
        if steps_this_pass == 0 and current_step() < recipe.max_steps:
            raise ValueError(
                f"this worker's share of the data holds fewer than batch_size_per_worker="
                f"{recipe.batch_size_per_worker} samples: use a smaller batch or fewer workers"
            )

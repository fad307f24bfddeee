"""One Ray Train launcher for both jobs (``train ps3`` and ``train vila-hd``).

``fit`` claims the run name on the cluster, refuses a storage folder whose checkpoints it could not
resume from, builds the ``TorchTrainer`` from the recipe's common fields, and returns a
``LaunchResult`` whose paths can be pasted back (``s3://`` kept) and whose metrics carry the skipped-row
counts. Launching again with the same run name and storage path resumes from the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ps3_engine.infra.storage import S3Settings
from ps3_engine.training.common.skips import NAMESPACE, SkipCounter, counter_totals

logger = logging.getLogger(__name__)

SNAPSHOT_NAME = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
CHECKPOINT_PREFIX = "checkpoint_"


class LaunchRefused(ValueError):
    """The launch was refused before anything started (bad data, a running twin, unresumable checkpoints)."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


@dataclass(frozen=True)
class LaunchResult:
    run_name: str
    storage_path: str
    steps: int
    metrics: dict[str, Any]
    checkpoint_path: str | None  # local path or s3:// URI, as given back to --storage-path / init_from


def storage_location(storage_path: str, s3: S3Settings | None) -> tuple[str, Any]:
    """Ray Train writes through pyarrow: a local folder (created), or an S3 path with our S3 filesystem."""
    if not storage_path.startswith("s3://"):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return str(Path(storage_path).resolve()), None
    from ps3_engine.infra.storage import resolve_filesystem

    filesystem, path = resolve_filesystem(storage_path, s3)
    return path, filesystem


def as_uri(fs_path: str, filesystem: Any) -> str:
    """A filesystem path as the user writes it: ``s3://bucket/key`` for S3 (pyarrow drops the scheme)."""
    if filesystem is not None and getattr(filesystem, "type_name", "") == "s3" and not fs_path.startswith("s3://"):
        return "s3://" + fs_path.lstrip("/")
    return fs_path


def check_resumable(storage_path: str, run_name: str, s3: S3Settings | None = None) -> None:
    """Refuse a run folder with checkpoints but no readable Ray Train snapshot.

    Without the snapshot Ray Train would silently start again from step 0 beside the old checkpoints
    (e.g. after a partial copy of the storage folder).

    Raises:
        LaunchRefused: with the folder and the two ways out.
    """
    import pyarrow.fs as pafs

    root, filesystem = storage_location(storage_path, s3)
    filesystem = filesystem or pafs.LocalFileSystem()
    run_dir = f"{root.rstrip('/')}/{run_name}"
    infos = filesystem.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    checkpoints = [i.base_name for i in infos if i.base_name.startswith(CHECKPOINT_PREFIX)]
    if not checkpoints:
        return
    where = as_uri(run_dir, filesystem if filesystem.type_name == "s3" else None)
    problem = None
    if not any(i.base_name == SNAPSHOT_NAME for i in infos):
        problem = f"{SNAPSHOT_NAME} is missing"
    else:
        try:
            with filesystem.open_input_stream(f"{run_dir}/{SNAPSHOT_NAME}") as handle:
                json.loads(handle.read())
        except (OSError, ValueError) as error:
            problem = f"{SNAPSHOT_NAME} is unreadable ({type(error).__name__})"
    if problem:
        raise LaunchRefused(
            f"{where} holds {len(checkpoints)} checkpoint folders but {problem}, so the run cannot resume; "
            f"restore the file, or start fresh under another --name (init_from=<checkpoint> keeps the weights)"
        )


def guard_name(storage_path: str, run_name: str) -> str:
    """The cluster-wide name of a launch: one per (storage path, run name)."""
    digest = hashlib.sha256(f"{storage_path.rstrip('/')}/{run_name}".encode()).hexdigest()[:16]
    return f"train-run-{run_name}-{digest}"


def claim_run(storage_path: str, run_name: str) -> tuple[Any, str]:
    """Create the launch's named actor (it also counts skipped rows); refuse if a twin launch holds the name.

    The actor belongs to this driver: it goes away when the launch ends or the driver dies, so a crashed
    launch never blocks the next one. Returns the actor and the counter name to give the transforms
    (the actor's name plus a nonce of this launch, see ``skips._counter``).

    Raises:
        LaunchRefused: another launch with this run name and storage path is running on the cluster.
    """
    import ray

    name = guard_name(storage_path, run_name)
    try:
        actor = ray.remote(SkipCounter).options(name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0).remote()
        ray.get(actor.totals.remote())
    except ValueError as error:
        raise LaunchRefused(
            f"run {run_name!r} under {storage_path} is already training on this cluster; "
            f"wait for it to finish or stop it, or launch under another --name"
        ) from error
    return actor, f"{name}#{uuid.uuid4().hex[:12]}"


def fit(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    recipe: Any,
    dataset: Any,
    storage_path: str,
    run_name: str,
    s3: S3Settings | None = None,
    counter_name: str | None = None,
) -> LaunchResult:
    """Run ``train_loop`` on ``recipe.num_workers`` Ray Train workers and return what it reported.

    ``recipe`` is a ``BaseRecipe`` (workers, GPUs, CPUs per worker, checkpoints to keep). The caller has
    claimed the run (``claim_run``) and passes the counter's name so the final metrics hold the totals.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    check_resumable(storage_path, run_name, s3)
    path, filesystem = storage_location(storage_path, s3)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "recipe": recipe.model_dump(mode="json"), "skip_counter": counter_name},
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
    metrics = {**(result.metrics or {}), **counter_totals(counter_name)}
    return LaunchResult(
        run_name=run_name,
        storage_path=storage_path,
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint_path=as_uri(result.checkpoint.path, filesystem) if result.checkpoint else None,
    )


def release(actor: Any) -> None:
    """Free the run name (the launch is over)."""
    import ray

    ray.kill(actor, no_restart=True)

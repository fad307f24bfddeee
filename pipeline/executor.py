"""Executors: stream shard tasks through stage workers, in-process or on Ray Data.

The unit of work is a shard: a worker reads the shard's input, runs the stage over it in batches and
commits output, errors and manifest before reporting. Ray Data streams the task list through a pool
of workers (an actor pool for model stages so weights load once per actor; tasks otherwise), with
concurrency bounded by the declared resources, so memory stays bounded at about one shard per worker
and the task queue applies backpressure. The in-process executor runs the very same worker code in
the driver, which is what you want under a debugger.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ps3_engine.infra.ray_cluster import ensure_ray as ensure_ray_cluster
from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.logs import ray_console_enabled, route_ray_logs
from ps3_engine.pipeline.progress import ItemCounts, ItemProgress, RayProgressPoller
from ps3_engine.pipeline.run_state import RunningMarker
from ps3_engine.pipeline.shard_runner import (
    BatchCallback,
    PreparedShard,
    ShardReport,
    StageSpec,
    failed_report,
    prepare_shard,
    run_shard,
)
from ps3_engine.stages.base import Resources, Stage

logger = logging.getLogger(__name__)

PREPARE_MEMORY_BYTES = 512 * 2**20
# Model actors are not restarted by Ray. Ray Data passes every pool actor its UDF as an object-store
# reference (ray.put of the map transformer), and Ray refuses to promise the restart of an actor whose
# constructor arguments live in the object store: with Ray Data's default max_restarts=-1 each actor
# creation logged an error-level line ("constructor arguments in the object store and max_restarts > 0").
# Recovery is per shard instead: when a worker is lost the Ray Data run stops, and the shards that had
# not reported run again in a fresh Ray Data run (fresh actors), up to MAX_RAY_RUNS runs in all; after
# that they become failed reports, which the next pipeline run recomputes (see _reports_retrying_lost).
ACTOR_RESTART_ARGS: dict[str, Any] = {"max_restarts": 0}
MAX_RAY_RUNS = 2


class ExecutorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ray", "local"] = "ray"
    ray_address: str | None = Field(None, description="Ray cluster address; None starts or joins a local one")
    max_workers: int | None = Field(None, ge=1, description="cap on parallel shard workers per stage")
    progress: bool = True
    pipelined: bool = Field(
        True,
        description="run: crawl shards flow on to segment, caption and corpus rows while the crawl goes on "
        "(pipeline/pipelined.py); false runs each stage to the end before the next",
    )


class ShardWorker:
    """Builds the stage once (``setup`` included) and runs shard tasks; used by both executors."""

    def __init__(
        self, spec: StageSpec, storage: Storage, fingerprint: str, progress: BatchCallback | None = None
    ) -> None:
        self.stage = spec.build()
        self.stage.setup()
        self.layout = RunLayout(storage)
        self.fingerprint = fingerprint
        self.progress = progress

    def run(self, task: ShardTask, prepared: PreparedShard | None = None) -> ShardReport:
        return run_shard(self.stage, self.layout, task, self.fingerprint, prepared=prepared, on_batch=self.progress)

    def _run_row(self, row: dict[str, Any]) -> ShardReport:
        task = ShardTask.from_json(row["task"])
        if "prepared" not in row:
            return self.run(task)
        if row["failure"]:
            return ShardReport(task.stage, task.shard_id, "failed", message=str(row["failure"]))
        prepared = PreparedShard.from_ipc(
            row["prepared"], row["prepared_errors"], int(row["input_rows"]), float(row["prepare_s"])
        )
        return self.run(task, prepared)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        reports = [json.dumps(self._run_row(row).to_dict()) for row in rows]
        return {"report": np.array(reports, dtype=object)}

    def close(self) -> None:
        self.stage.teardown()


def _progress(reports: Iterator[ShardReport], progress: ItemProgress, marker: RunningMarker) -> Iterator[ShardReport]:
    """Pass shard reports on; the bar moves per batch (workers report), this settles it per shard.

    When every shard has reported, the bar shows the reports' exact sums: the workers' last batch
    counts may still be on their way to the progress actor.
    """
    computed, failed = [], 0
    for report in reports:
        marker.shard_reported()
        if report.status == "computed":
            computed.append(report)
        else:
            failed += 1
            progress.note(f"{report.stage}: shard {report.shard_id} failed: {report.message.splitlines()[0]}")
        yield report
    final = ItemCounts(
        shards_started=len(computed),
        loaded_items=sum(r.input_rows for r in computed),
        items=sum(r.input_rows for r in computed),
        outputs=sum(r.output_rows for r in computed),
        errors=sum(r.error_rows for r in computed),
    )
    progress.num_shards = len(computed)  # failed shards' items are not coming: the bar ends at 100%
    progress.show(final)
    if failed:
        progress.mark_failed(failed)


class InProcessExecutor:
    num_workers = 1

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config

    def run(
        self, spec: StageSpec, storage: Storage, fingerprint: str, tasks: Sequence[ShardTask]
    ) -> Iterator[ShardReport]:
        if not tasks:
            return
        stage = spec.stage_cls.name
        progress = ItemProgress(stage, len(tasks), self.config.progress)
        with RunningMarker(storage, stage, [t.shard_id for t in tasks]) as marker:
            worker = ShardWorker(spec, storage, fingerprint, progress.on_batch)
            try:
                yield from _progress((worker.run(t) for t in tasks), progress, marker)
            finally:
                worker.close()
                progress.close()


def ensure_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one (``infra.ray_cluster``).

    Under the CLI without -v, Ray's own lines (and its workers' output) go to the run's log file.
    """
    ensure_ray_cluster(address, log_to_driver=ray_console_enabled(), before_init=route_ray_logs)


class RayDataExecutor:
    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.num_workers = 0  # stage workers of the last run (for the busy fraction in the summary)

    @staticmethod
    def fit_resources(resources: Resources, stage: str) -> Resources:
        """Drop an optional GPU request on a GPU-less cluster; refuse a required one clearly."""
        import ray

        if resources.num_gpus and not ray.cluster_resources().get("GPU"):
            if resources.gpu_optional:
                logger.warning("%s: the Ray cluster has no GPU, running on CPU", stage)
                return replace(resources, num_gpus=0.0)
            raise ValueError(f"{stage} needs {resources.num_gpus} GPU per worker but the Ray cluster has none")
        return resources

    def run(
        self, spec: StageSpec, storage: Storage, fingerprint: str, tasks: Sequence[ShardTask]
    ) -> Iterator[ShardReport]:
        if not tasks:
            return
        import ray
        import ray.data

        ensure_ray(self.config.ray_address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        resources = self.fit_resources(spec.build().resources, spec.stage_cls.name)
        num_workers = worker_count(resources, len(tasks), self.config.max_workers)
        self.num_workers = num_workers
        stage_name = spec.stage_cls.name
        progress = ItemProgress(stage_name, len(tasks), self.config.progress)
        marker = RunningMarker(storage, stage_name, [t.shard_id for t in tasks])
        with marker, RayProgressPoller(progress) as poller:
            try:

                def plan(remaining: Sequence[ShardTask]) -> Any:
                    return self._plan(spec, storage, fingerprint, remaining, resources, num_workers, poller.callback)

                yield from _progress(_reports_retrying_lost(plan, tasks), progress, marker)
            finally:
                progress.close()

    def _plan(
        self,
        spec: StageSpec,
        storage: Storage,
        fingerprint: str,
        tasks: Sequence[ShardTask],
        resources: Resources,
        num_workers: int,
        progress: BatchCallback,
    ) -> Any:
        """The Ray Data plan of one stage: (CPU phase tasks ->) model actors or I/O tasks -> reports."""
        import ray
        import ray.data

        rows = [{"task": t.to_json()} for t in tasks]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        remote_args: dict[str, Any] = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus}
        if resources.memory_bytes:
            remote_args["memory"] = resources.memory_bytes
        stage = spec.build()
        if stage.prepared_schema is not None:
            # The CPU phase runs as its own operator on the CPUs the model workers leave free; Ray Data
            # streams prepared shards to the model actors and backpressures this operator when they lag.
            spare_cpus = int(ray.cluster_resources().get("CPU", 1) - num_workers * resources.num_cpus)
            prepare_workers = max(1, min(spare_cpus, len(tasks), self.config.max_workers or len(tasks)))
            dataset = dataset.map_batches(
                _prepare_tasks,
                fn_args=(spec, storage, progress),
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.TaskPoolStrategy(size=prepare_workers),
                num_cpus=1,
                # A memory reservation for the full-resolution decodes. It also makes this operator's remote
                # args differ from the model actors', which keeps Ray Data from fusing the CPU phase into
                # the actors (on a GPU-less cluster the two would otherwise look identical and be fused).
                memory=PREPARE_MEMORY_BYTES,
            )
            logger.debug("%s: CPU phase on up to %d Ray tasks", spec.stage_cls.name, prepare_workers)
        if resources.uses_model:
            compute = ray.data.ActorPoolStrategy(min_size=1, max_size=num_workers)
            with warnings.catch_warnings():
                # Ray 2.60 names no map_batches parameter for max_restarts, so it travels as a plain remote
                # arg, which 2.60 flags as deprecated; test_progress checks that the setting still applies.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                mapped = dataset.map_batches(
                    ShardWorker,
                    fn_constructor_args=(spec, storage, fingerprint, progress),
                    batch_size=1,
                    batch_format="numpy",
                    compute=compute,
                    **ACTOR_RESTART_ARGS,
                    **remote_args,
                )
        else:
            mapped = dataset.map_batches(
                _run_tasks_once,
                fn_args=(spec, storage, fingerprint, progress),
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.TaskPoolStrategy(size=num_workers),
                **remote_args,
            )
        logger.debug("%s: %d shards on %d Ray workers", spec.stage_cls.name, len(tasks), num_workers)
        return mapped


def _reports_retrying_lost(
    plan: Callable[[Sequence[ShardTask]], Any], tasks: Sequence[ShardTask]
) -> Iterator[ShardReport]:
    """The shard reports of Ray Data runs over ``tasks``. When a run dies (a worker lost, a node gone),
    the shards that had not reported run again in a fresh run; after :data:`MAX_RAY_RUNS` runs they get
    failed reports, so the pipeline goes on and its next run recomputes them. Rerunning a shard is safe:
    commits are atomic and deterministic."""
    import ray.exceptions

    remaining = list(tasks)
    for attempt in range(1, MAX_RAY_RUNS + 1):
        reported = set()
        try:
            for row in plan(remaining).iter_rows():
                report = ShardReport(**json.loads(row["report"]))
                reported.add(report.shard_id)
                yield report
            return
        except ray.exceptions.RayError as exc:
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            remaining = [t for t in remaining if t.shard_id not in reported]
            if not remaining:  # the run died after its last report: nothing is lost
                return
            stage = remaining[0].stage
            if attempt < MAX_RAY_RUNS:
                logger.warning(
                    "%s: the Ray run stopped (%s); running its %d unreported shards again",
                    stage,
                    reason,
                    len(remaining),
                )
                continue
            logger.warning("%s: the Ray run stopped again (%s); %d shards marked failed", stage, reason, len(remaining))
            for task in remaining:
                message = f"the Ray run failed (a worker lost or a worker setup error): {reason}"
                yield ShardReport(task.stage, task.shard_id, "failed", message=message)


def _prepare_tasks(
    batch: dict[str, np.ndarray], spec: StageSpec, storage: Storage, progress: BatchCallback | None = None
) -> dict[str, np.ndarray]:
    """CPU phase of a two-phase stage, one shard per call; failures travel on to be reported."""
    stage = spec.build()
    layout = RunLayout(storage)
    columns: dict[str, list[Any]] = {
        k: [] for k in ("task", "prepared", "prepared_errors", "input_rows", "prepare_s", "failure")
    }
    for task_json in batch["task"]:
        prepared = prepare_payload(stage, layout, ShardTask.from_json(task_json), progress)
        for key, value in zip(columns, (task_json, *prepared), strict=True):
            columns[key].append(value)
    return {key: np.array(values, dtype=object) for key, values in columns.items()}


def prepare_payload(
    stage: Stage, layout: RunLayout, task: ShardTask, progress: BatchCallback | None = None
) -> tuple[bytes, bytes, int, float, str]:
    """One shard's CPU phase as row values: ``(prepared IPC, errors IPC, input rows, seconds, failure)``.

    A failure travels on as its message (the model worker reports the shard failed), never as an
    exception that would stop the Ray Data run.
    """
    try:
        prepared = prepare_shard(stage, layout, task, on_batch=progress)
    except Exception as exc:
        return b"", b"", 0, 0.0, failed_report(task, exc, 0.0).message
    payload, errors = prepared.to_ipc()
    return payload, errors, prepared.input_rows, prepared.prepare_s, ""


def _run_tasks_once(
    batch: dict[str, np.ndarray],
    spec: StageSpec,
    storage: Storage,
    fingerprint: str,
    progress: BatchCallback | None = None,
) -> dict[str, np.ndarray]:
    """Task-pool variant for I/O stages: a fresh worker per shard (cheap setup, nothing to keep)."""
    worker = ShardWorker(spec, storage, fingerprint, progress)
    try:
        return worker(batch)
    finally:
        worker.close()


def worker_count(resources: Resources, num_tasks: int, cap: int | None) -> int:
    """Workers of one stage on the current Ray cluster: what fits, capped by tasks and configured caps."""
    import ray

    cluster = ray.cluster_resources()
    if resources.num_gpus:
        fit = int(cluster.get("GPU", 0) // resources.num_gpus)
    else:
        fit = int(cluster.get("CPU", 1) // max(resources.num_cpus, 0.001))
    caps = [c for c in (resources.max_workers, cap) if c]
    return max(1, min([fit, num_tasks, *caps]))


def make_executor(config: ExecutorConfig) -> InProcessExecutor | RayDataExecutor:
    return RayDataExecutor(config) if config.kind == "ray" else InProcessExecutor(config)

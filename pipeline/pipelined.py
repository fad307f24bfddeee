"""Pipelined run: crawl shards flow on to segment, caption and corpus rows while the crawl goes on.

Stage by stage (``run_pipeline`` with ``executor.pipelined=false``) each stage waits for the whole stage
before it; on a multi-day crawl the GPU workers would wait for days. Here every crawl shard travels a
chain of steps::

    crawl -> dedup gate -> segment -> caption (CPU phase -> model phase) -> corpus rows

Each step runs one stage on one shard exactly as the stage-by-stage executors do (the same
:class:`~ps3_engine.pipeline.executor.ShardWorker`, the same task and input checksum, the same commit),
skips a shard that is complete and fresh (unless the stage is forced), and builds the next stage's task
from the committed manifests (:func:`~ps3_engine.pipeline.runner.segment_task` and its siblings, which the
stage-by-stage planners use too). The gate holds crawl shards until their whole dedup wave
(:func:`~ps3_engine.pipeline.dedup.wave_key`) has reported and decides waves in key order
(:class:`~ps3_engine.pipeline.dedup.WaveDedup`): a decision is final once made and equals
``run_dedup``'s, so the corpus equals a stage-by-stage run's row for row (tests/pipeline/test_pipelined.py).
Packing the dataset stays a barrier: its meaning needs every shard.

On Ray the chain is one Ray Data streaming plan: task pools for the crawl, caption's CPU phase and the
corpus rows, actor pools for model stages (weights load once per actor), and one gate actor on the
driver's node (the dedup index lives there, like the stage-by-stage dedup in the driver). Ray Data's
backpressure keeps crawl workers, model actors and the gate busy at the same time. In process, shards go
wave by wave through the same steps, which is what you want under a debugger.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, closing
from typing import TYPE_CHECKING, Any

import numpy as np

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.dedup import WaveDedup, wave_key
from ps3_engine.pipeline.dedup_sweep import shard_order_key
from ps3_engine.pipeline.executor import (
    ACTOR_RESTART_ARGS,
    MAX_RAY_RUNS,
    PREPARE_MEMORY_BYTES,
    RayDataExecutor,
    ShardWorker,
    ensure_ray,
    prepare_payload,
    worker_count,
)
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.progress import ItemProgress, RayProgressPoller
from ps3_engine.pipeline.run_state import RunningMarker
from ps3_engine.pipeline.shard_runner import (
    BatchCallback,
    PreparedShard,
    ShardReport,
    StageSpec,
)
from ps3_engine.schemas import ManifestEntry
from ps3_engine.stages.base import Resources

if TYPE_CHECKING:
    from ps3_engine.pipeline.config import RunConfig

logger = logging.getLogger(__name__)

# The shard stages a crawl shard passes through, in order (build-corpus's per-shard stage is "corpus").
CHAIN = ("crawl", "segment", "caption", "corpus")
COLUMNS = ("shard_id", "task", "reports")


def task_to_json(task: ShardTask | None) -> str:
    """A row's ``task``: "" once the chain has ended for the shard."""
    return task.to_json() if task is not None else ""


def task_from_json(text: str) -> ShardTask | None:
    return ShardTask.from_json(text) if text else None


def next_task(layout: RunLayout, stage: str, shard_id: str) -> ShardTask | None:
    """The task of the stage after ``stage`` for ``shard_id``, from the committed manifests (None: none)."""
    from ps3_engine.pipeline.runner import caption_task, corpus_task

    if stage == "corpus":
        return None
    crawl = layout.read_manifest("crawl", shard_id)
    segment = layout.read_manifest("segment", shard_id)
    if crawl is None or segment is None:
        return None
    if stage == "segment":
        return caption_task(shard_id, segment, crawl)
    caption = layout.read_manifest("caption", shard_id)
    return corpus_task(shard_id, caption, segment, crawl) if caption is not None else None


class ChainStep:
    """Runs one shard stage on one shard per row and hands the next stage's task on (both executors).

    Rows carry ``shard_id``, ``task`` (this stage's task as JSON, or "" when the chain ended for the
    shard) and ``reports`` (a JSON list of the shard's reports so far). A shard that is complete and
    fresh is reported ``skipped`` and not recomputed, unless ``force``.
    """

    def __init__(
        self, spec: StageSpec, stage: str, storage: Storage, force: bool, progress: BatchCallback | None = None
    ) -> None:
        self.stage = stage
        self.layout = RunLayout(storage)
        self.force = force
        self.fingerprint = spec.build().fingerprint()
        self._worker_args = (spec, storage, self.fingerprint, progress)
        # Built (model weights loaded) at the first shard to compute: a rerun whose shards are all
        # complete and fresh loads no model, as a stage-by-stage rerun with nothing pending starts none.
        self._worker: ShardWorker | None = None

    @property
    def worker(self) -> ShardWorker:
        if self._worker is None:
            self._worker = ShardWorker(*self._worker_args)
        return self._worker

    def is_done(self, task: ShardTask) -> bool:
        if self.force:
            return False
        entry = self.layout.read_manifest(task.stage, task.shard_id)
        return self.layout.shard_state(task, self.fingerprint, entry) == "done"

    def run(self, task: ShardTask, prepared: PreparedShard | None = None) -> ShardReport:
        if prepared is None and self.is_done(task):
            return ShardReport(task.stage, task.shard_id, "skipped")
        return self.worker.run(task, prepared)

    def advance(self, shard_id: str, task: ShardTask | None, prepared: PreparedShard | None = None) -> tuple:
        """``(report or None, next task or None)`` for one shard."""
        if task is None:
            return None, None
        report = self.run(task, prepared)
        return report, next_task(self.layout, self.stage, shard_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for index, shard_id in enumerate(batch["shard_id"]):
            task = task_from_json(batch["task"][index])
            reports = json.loads(batch["reports"][index])
            prepared = _prepared_from_row(batch, index)
            if isinstance(prepared, ShardReport):  # the CPU phase failed: the shard ends here
                report, following = prepared, None
            else:
                report, following = self.advance(shard_id, task, prepared)
            if report is not None:
                reports.append(report.to_dict())
            out["shard_id"].append(shard_id)
            out["task"].append(task_to_json(following))
            out["reports"].append(json.dumps(reports))
        return {name: np.array(values, dtype=object) for name, values in out.items()}

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()


def _prepared_from_row(batch: dict[str, np.ndarray], index: int) -> PreparedShard | ShardReport | None:
    if "prepared" not in batch:
        return None
    task = task_from_json(batch["task"][index])
    if task is None or batch["skip"][index]:
        return None
    if batch["failure"][index]:
        return ShardReport(task.stage, task.shard_id, "failed", message=str(batch["failure"][index]))
    return PreparedShard.from_ipc(
        batch["prepared"][index],
        batch["prepared_errors"][index],
        int(batch["input_rows"][index]),
        float(batch["prepare_s"][index]),
    )


class DedupGate:
    """Holds crawl shards until their dedup wave is complete; decides waves in key order, then releases.

    ``planned`` are this run's crawl shards (each arrives once, computed, skipped or failed);
    ``committed`` are the run's other committed crawl shards (from earlier plans), whose waves are
    complete from the start. A released shard leaves with its segment task (None when it has no
    committed crawl output). Without dedup, waves are held the same way and a row whose image id an
    earlier shard (or row) already holds is excluded, as :meth:`RunLayout.excluded_items` does for the
    stage-by-stage planner: a task built otherwise would be recomputed by the pass after the chain.
    """

    def __init__(
        self,
        storage: Storage,
        planned: list[str],
        committed: list[str],
        dedup: bool,
        max_distance: int,
        wave_shards: int,
    ) -> None:
        self.layout = RunLayout(storage)
        self.dedup = WaveDedup(self.layout, max_distance, wave_shards) if dedup else None
        self.wave_shards = wave_shards
        self.members: dict[tuple[str, int], set[str]] = {}
        for shard_id in {*planned, *committed}:
            self.members.setdefault(wave_key(shard_id, wave_shards), set()).add(shard_id)
        # One set, not one per shard inside the comprehension (quadratic: minutes at 80k shards, 10M items).
        planned_ids = set(planned)
        self.waiting = {key: members & planned_ids for key, members in self.members.items()}
        self.arrived: dict[str, str] = {}  # shard id -> its reports JSON, until released
        self.seen_images: set[str] = set()  # without dedup: image ids of the shards decided so far
        self.order = sorted(self.members)
        self.next_wave = 0

    def feed(self, shard_id: str, reports: str) -> list[tuple[str, ShardTask | None, str]]:
        """Take one crawl shard; return ``(shard id, segment task, reports)`` of every shard released now."""
        from ps3_engine.pipeline.runner import segment_task

        self.arrived[shard_id] = reports
        self.waiting[wave_key(shard_id, self.wave_shards)].discard(shard_id)
        released = []
        while self.next_wave < len(self.order) and not self.waiting[self.order[self.next_wave]]:
            key = self.order[self.next_wave]
            members = sorted(self.members[key], key=shard_order_key)
            began = time.perf_counter()
            entries = {s: self.layout.read_manifest("crawl", s) for s in members}
            committed = [s for s in members if entries[s] is not None]
            if self.dedup is not None:
                excluded = self.dedup.decide(committed)
            else:
                excluded = self._repeated_images({s: entries[s] for s in committed})
            logger.info(
                "dedup wave %s-%d: %d shards decided in %.2f s, %d rows dropped",
                *key,
                len(members),
                time.perf_counter() - began,
                sum(len(ids) for ids in excluded.values()),
            )
            for shard in members:
                if shard in self.arrived:
                    entry = entries[shard]
                    task = segment_task(shard, entry, excluded.get(shard, ())) if entry else None
                    released.append((shard, task, self.arrived.pop(shard)))
            self.next_wave += 1
        if self.dedup is not None and released and self.next_wave == len(self.order):
            # The last wave is decided: persist the links so a later increment need not search again.
            self.dedup.persist_links()
        return released

    def _repeated_images(self, entries: dict[str, ManifestEntry]) -> dict[str, tuple[str, ...]]:
        """Without dedup: rows whose image id an earlier shard or row holds (sorted item ids by shard)."""
        excluded = {}
        for shard_id, entry in entries.items():
            rows = self.layout.storage.read_parquet(entry.output_key, columns=["item_id", "image_id"]).to_pylist()
            repeated = []
            for row in rows:
                if row["image_id"] in self.seen_images:
                    repeated.append(row["item_id"])
                self.seen_images.add(row["image_id"])
            excluded[shard_id] = tuple(sorted(repeated))
        return excluded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        for shard_id, reports in zip(batch["shard_id"], batch["reports"], strict=True):
            for shard, task, shard_reports in self.feed(shard_id, reports):
                out["shard_id"].append(shard)
                out["task"].append(task_to_json(task))
                out["reports"].append(shard_reports)
        return {name: np.array(values, dtype=object) for name, values in out.items()}


def _prepare_rows(
    batch: dict[str, np.ndarray],
    spec: StageSpec,
    storage: Storage,
    force: bool,
    progress: BatchCallback | None = None,
) -> dict[str, np.ndarray]:
    """Caption's CPU phase as its own Ray tasks (ahead of the model actors), one shard per row."""
    stage = spec.build()
    layout = RunLayout(storage)
    fingerprint = stage.fingerprint()
    extra: dict[str, list[Any]] = {k: [] for k in ("skip", "prepared", "prepared_errors", "input_rows", "prepare_s")}
    extra["failure"] = []
    for text in batch["task"]:
        task = task_from_json(text)
        skip, values = False, (b"", b"", 0, 0.0, "")
        if task is not None:
            entry = layout.read_manifest(task.stage, task.shard_id)
            skip = not force and layout.shard_state(task, fingerprint, entry) == "done"
            if not skip:
                values = prepare_payload(stage, layout, task, progress)
        for key, value in zip(extra, (skip, *values), strict=True):
            extra[key].append(value)
    return {**batch, **{key: np.array(values, dtype=object) for key, values in extra.items()}}


def _run_step_once(
    batch: dict[str, np.ndarray],
    spec: StageSpec,
    stage: str,
    storage: Storage,
    force: bool,
    progress: BatchCallback | None = None,
) -> dict[str, np.ndarray]:
    """Task-pool variant of :class:`ChainStep` for stages without a model (cheap setup)."""
    step = ChainStep(spec, stage, storage, force, progress)
    try:
        return step(batch)
    finally:
        step.close()


def _crawl_rows(tasks: list[ShardTask]) -> list[dict[str, str]]:
    return [{"shard_id": t.shard_id, "task": task_to_json(t), "reports": "[]"} for t in tasks]


def wave_ordered(tasks: list[ShardTask], wave_shards: int) -> list[ShardTask]:
    """Crawl tasks in dedup wave order, so that waves complete (and flow on) one after another."""
    return sorted(tasks, key=lambda t: (wave_key(t.shard_id, wave_shards), t.shard_id))


class PipelinedRun:
    """One pipelined execution of the chain over ``crawl_tasks``; yields every shard report as it comes."""

    def __init__(self, config: RunConfig, layout: RunLayout, crawl_tasks: list[ShardTask], forced: set[str]) -> None:
        self.config = config
        self.layout = layout
        self.tasks = wave_ordered(crawl_tasks, config.crawl.dedup_wave_shards)
        self.forced = forced
        self.num_workers: dict[str, int] = {}

    def _bar(self, stage: str, position: int) -> ItemProgress:
        return ItemProgress(stage, len(self.tasks), self.config.executor.progress, position=position)

    def gate(self) -> DedupGate:
        return DedupGate(*self._gate_args(self.tasks))

    def reports(self) -> Iterator[ShardReport]:
        if not self.tasks:
            return
        shard_ids = [t.shard_id for t in self.tasks]
        with ExitStack() as stack:
            markers = {s: stack.enter_context(RunningMarker(self.layout.storage, s, shard_ids)) for s in CHAIN}
            on_ray = self.config.executor.kind == "ray"
            rows = self._ray_rows(stack) if on_ray else self._in_process_rows(stack)
            for reports in rows:
                for report in reports:
                    markers[report.stage].shard_reported()
                    yield report

    # -- in process ---------------------------------------------------------------------------------

    def _in_process_rows(self, stack: ExitStack) -> Iterator[list[ShardReport]]:
        from ps3_engine.pipeline.runner import stage_specs

        storage, specs = self.layout.storage, stage_specs(self.config)
        steps = {}
        for position, stage in enumerate(CHAIN):
            progress = stack.enter_context(closing(self._bar(stage, position)))
            steps[stage] = ChainStep(specs[stage], stage, storage, stage in self.forced, progress.on_batch)
            stack.callback(steps[stage].close)
        self.num_workers = dict.fromkeys(CHAIN, 1)
        gate = self.gate()
        for task in self.tasks:
            crawl_report = steps["crawl"].run(task)
            yield [crawl_report]
            for shard_id, segment, _ in gate.feed(task.shard_id, "[]"):
                task_now, reports = segment, []
                for stage in CHAIN[1:]:
                    report, task_now = steps[stage].advance(shard_id, task_now)
                    if report is not None:
                        reports.append(report)
                yield reports

    # -- on Ray -------------------------------------------------------------------------------------

    def _ray_rows(self, stack: ExitStack) -> Iterator[list[ShardReport]]:
        import ray
        import ray.data

        ensure_ray(self.config.executor.ray_address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Ray Data checks a task pool's cap against the inputs present at start; here they arrive later.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'MapBatches")
        callbacks = {}
        for position, stage in enumerate(CHAIN):
            progress = stack.enter_context(closing(self._bar(stage, position)))
            callbacks[stage] = stack.enter_context(RayProgressPoller(progress)).callback
        remaining = list(self.tasks)
        for attempt in range(1, MAX_RAY_RUNS + 1):
            reported: set[str] = set()
            try:
                for row in self._ray_plan(remaining, callbacks).iter_rows():
                    reports = [ShardReport(**r) for r in json.loads(row["reports"])]
                    reported.add(row["shard_id"])
                    yield reports
                return
            except ray.exceptions.RayError as exc:
                # Rerunning is safe: commits are atomic and deterministic, and done shards are skipped.
                remaining = [t for t in remaining if t.shard_id not in reported]
                text = str(exc).strip().splitlines()
                reason = f"{type(exc).__name__}: {text[0] if text else ''}"
                if not remaining or attempt == MAX_RAY_RUNS:
                    # What is left is finished by the stage-by-stage pass after the chain.
                    logger.warning("pipelined run stopped (%s); %d shards left for later", reason, len(remaining))
                    return
                logger.warning("pipelined run stopped (%s); running %d unfinished shards again", reason, len(remaining))

    def _ray_plan(self, tasks: list[ShardTask], callbacks: dict[str, BatchCallback]) -> Any:
        import ray
        import ray.data
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from ps3_engine.pipeline.runner import stage_specs

        config, storage = self.config, self.layout.storage
        specs = stage_specs(config)
        resources = {s: RayDataExecutor.fit_resources(specs[s].build().resources, s) for s in CHAIN}
        share = _cpu_share(resources)
        dataset = ray.data.from_items(_crawl_rows(tasks), override_num_blocks=len(tasks))
        # One row (one shard) per block in every operator: the gate releases a whole wave in one call, and
        # Ray Data would otherwise hand that one block to one downstream task, which runs its shards one
        # after another. The setting lives in this dataset's own copy of the context.
        dataset.context.target_max_block_size = 1
        for stage in CHAIN:
            wanted = resources[stage]
            workers = worker_count(wanted, len(tasks), config.executor.max_workers)
            self.num_workers[stage] = workers
            args: dict[str, Any] = {"num_cpus": wanted.num_cpus * share, "num_gpus": wanted.num_gpus}
            if wanted.memory_bytes:
                args["memory"] = wanted.memory_bytes
            force = stage in self.forced
            if stage == "caption" and specs["caption"].build().prepared_schema is not None:
                dataset = dataset.map_batches(
                    _prepare_rows,
                    fn_args=(specs[stage], storage, force, callbacks[stage]),
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.TaskPoolStrategy(size=workers),
                    num_cpus=share,
                    memory=PREPARE_MEMORY_BYTES,
                )
            if wanted.uses_model:
                with warnings.catch_warnings():
                    # See executor.py: max_restarts travels as a plain remote arg, flagged deprecated in 2.60.
                    warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                    dataset = dataset.map_batches(
                        ChainStep,
                        fn_constructor_args=(specs[stage], stage, storage, force, callbacks[stage]),
                        batch_size=1,
                        batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                        **ACTOR_RESTART_ARGS,
                        **args,
                    )
            else:
                dataset = dataset.map_batches(
                    _run_step_once,
                    fn_args=(specs[stage], stage, storage, force, callbacks[stage]),
                    batch_size=1,
                    batch_format="numpy",
                    compute=ray.data.TaskPoolStrategy(size=workers),
                    **args,
                )
            if stage == "crawl":
                # One gate, on the driver's node: the dedup index is held in its memory between waves.
                here = ray.get_runtime_context().get_node_id()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                    dataset = dataset.map_batches(
                        DedupGate,
                        fn_constructor_args=self._gate_args(tasks),
                        batch_size=1,
                        batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1),
                        num_cpus=0,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
                        **ACTOR_RESTART_ARGS,
                    )
        return dataset

    def _gate_args(self, tasks: list[ShardTask]) -> tuple:
        """:class:`DedupGate`'s arguments with ``tasks`` as the planned shards (in process, or a Ray actor)."""
        crawl = self.config.crawl
        planned = [t.shard_id for t in tasks]
        committed = sorted(self.layout.manifests("crawl"))
        return (
            self.layout.storage,
            planned,
            committed,
            crawl.dedup,
            crawl.near_dup_max_distance,
            crawl.dedup_wave_shards,
        )


def _cpu_share(resources: dict[str, Resources]) -> float:
    """The factor on every step's CPU request so that one worker of each step fits the cluster at once.

    Stage by stage, one stage holds the whole cluster; here every step needs a worker at the same time
    (a model actor pool that takes every CPU would starve the crawl that feeds it). Ray's CPU requests
    only place work, so a fractional request limits nothing inside the process.
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    # The steps, plus caption's CPU phase when it has one (the gate asks for no CPU).
    wanted = sum(r.num_cpus for r in resources.values()) + 1.0
    return min(1.0, cpus / wanted)


def run_chain(config: RunConfig, layout: RunLayout, crawl_tasks: list[ShardTask], forced: set[str]) -> dict:
    """Run the chain; returns ``{"reports": {stage: [ShardReport]}, "seen": {stage: {shard id}},
    "workers": {stage: n}}`` (``seen``: every shard the chain reported, skipped ones included).

    ``skipped`` reports (complete and fresh shards) are left out, as the stage-by-stage executors
    leave such shards out of their task lists.
    """
    run = PipelinedRun(config, layout, crawl_tasks, forced)
    by_stage: dict[str, list[ShardReport]] = {stage: [] for stage in CHAIN}
    seen: dict[str, set[str]] = {stage: set() for stage in CHAIN}
    for report in run.reports():
        seen[report.stage].add(report.shard_id)
        if report.status != "skipped":
            by_stage[report.stage].append(report)
    workers = {stage: max(1, n) for stage, n in run.num_workers.items()}
    return {"reports": by_stage, "seen": seen, "workers": workers}

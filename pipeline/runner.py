"""Running stages over a run root: plan shards, skip what is complete and fresh, execute, summarise."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import RunConfig, snapshot
from ps3_engine.pipeline.corpus import build_corpus
from ps3_engine.pipeline.dedup import run_dedup
from ps3_engine.pipeline.documents import plan_document_corpus, plan_documents
from ps3_engine.pipeline.executor import make_executor
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.shard_runner import ShardReport, StageSpec
from ps3_engine.pipeline.sources import plan_crawl
from ps3_engine.schemas import ManifestEntry
from ps3_engine.stages.caption import CaptionStage
from ps3_engine.stages.corpus import CorpusStage
from ps3_engine.stages.crawl import CrawlStage
from ps3_engine.stages.documents.corpus import DocumentCorpusStage
from ps3_engine.stages.render import RenderStage
from ps3_engine.stages.segment import SegmentStage

logger = logging.getLogger(__name__)

STAGE_ORDER = ("crawl", "segment", "caption", "build-corpus")
IMPLEMENTED_STAGES = STAGE_ORDER


@dataclass
class StageRunResult:
    stage: str
    planned_shards: int
    skipped_shards: int
    computed_shards: int
    failed_shards: list[str]
    input_rows: int
    output_rows: int
    error_rows: int
    wall_s: float
    busy_s: float
    workers: int = 1
    kept_rows: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    filtered_by_reason: dict[str, int] = field(default_factory=dict)
    dedup: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None

    @property
    def throughput_rows_per_s(self) -> float:
        return self.input_rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def busy_fraction(self) -> float:
        """Share of the stage workers' wall time spent inside the stage's batches (model actors: model work)."""
        return self.busy_s / (self.wall_s * self.workers) if self.wall_s > 0 and self.workers else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "throughput_rows_per_s": round(self.throughput_rows_per_s, 3),
            "busy_fraction": round(self.busy_fraction, 3),
        }


def open_run(config: RunConfig) -> RunLayout:
    return RunLayout(Storage(config.run_root, config.s3))


def _with_run_s3(stage_config: Any, config: RunConfig) -> Any:
    """Stages read sources/images through their own ``s3`` settings; default them to the run's."""
    if stage_config.s3 == type(stage_config.s3)() and config.s3 != stage_config.s3:
        return stage_config.model_copy(update={"s3": config.s3})
    return stage_config


def stage_specs(config: RunConfig) -> dict[str, StageSpec]:
    return {
        "crawl": StageSpec(CrawlStage, _with_run_s3(config.crawl, config)),
        "segment": StageSpec(SegmentStage, _with_run_s3(config.segment, config)),
        "caption": StageSpec(CaptionStage, _with_run_s3(config.caption, config)),
        "corpus": StageSpec(CorpusStage, config.corpus),
        "render": StageSpec(RenderStage, _with_run_s3(config.render, config)),
        # Documents share the image corpus's split settings so one image id -> one split everywhere.
        "document-corpus": StageSpec(
            DocumentCorpusStage,
            config.document_corpus.model_copy(
                update={
                    "validation_fraction": config.corpus.validation_fraction,
                    "split_salt": config.corpus.split_salt,
                }
            ),
        ),
    }


def stage_fingerprints(config: RunConfig) -> dict[str, str]:
    return {name: spec.build().fingerprint() for name, spec in stage_specs(config).items()}


def write_snapshot(layout: RunLayout, config: RunConfig) -> None:
    """Snapshot the resolved config; rewritten only when config or fingerprints changed."""
    fresh = snapshot(config, stage_fingerprints(config))
    if layout.storage.exists(layout.RUN_CONFIG_KEY):
        previous = layout.storage.read_json(layout.RUN_CONFIG_KEY)
        if previous.get("config") == fresh["config"] and previous.get("fingerprints") == fresh["fingerprints"]:
            return
    layout.write_run_config(fresh)


def pending_tasks(layout: RunLayout, tasks: list[ShardTask], fingerprint: str) -> list[ShardTask]:
    manifests = layout.manifests(tasks[0].stage) if tasks else {}
    return [t for t in tasks if layout.shard_state(t, fingerprint, manifests.get(t.shard_id)) != "done"]


def segment_task(shard_id: str, crawl: ManifestEntry, excluded: tuple[str, ...]) -> ShardTask:
    """The segment task of one committed crawl shard, minus the rows the dedup dropped (sorted ids)."""
    checksum = hashlib.sha256("\n".join([crawl.output_checksum, *excluded]).encode()).hexdigest()
    return ShardTask("segment", shard_id, crawl.output_key, checksum, (shard_id,), exclude_item_ids=excluded)


def caption_task(shard_id: str, segment: ManifestEntry, crawl: ManifestEntry) -> ShardTask:
    """The caption task of one committed segment shard, joined with the crawl shard holding its images."""
    checksum = hashlib.sha256(f"{segment.output_checksum}\n{crawl.output_checksum}".encode()).hexdigest()
    return ShardTask(
        "caption", shard_id, segment.output_key, checksum, (shard_id,), side_input_keys=(crawl.output_key,)
    )


def corpus_task(shard_id: str, caption: ManifestEntry, segment: ManifestEntry, crawl: ManifestEntry) -> ShardTask:
    """The per-shard corpus task of one committed caption shard, joined with its segment and crawl shards."""
    parts = [caption.output_checksum, segment.output_checksum, crawl.output_checksum]
    return ShardTask(
        "corpus",
        shard_id,
        caption.output_key,
        hashlib.sha256("\n".join(parts).encode()).hexdigest(),
        (shard_id,),
        side_input_keys=(segment.output_key, crawl.output_key),
    )


def plan_segment(layout: RunLayout) -> list[ShardTask]:
    """One segment shard per committed crawl shard, minus the rows the dedup dropped (or repeated images)."""
    dropped_by_shard = layout.excluded_items()
    return [
        segment_task(shard_id, entry, tuple(sorted(dropped_by_shard.get(shard_id, []))))
        for shard_id, entry in sorted(layout.manifests("crawl").items())
    ]


def plan_caption(layout: RunLayout) -> list[ShardTask]:
    """One caption shard per committed segment shard, joined with the crawl shard holding its images."""
    crawl = layout.manifests("crawl")
    tasks = []
    for shard_id, entry in sorted(layout.manifests("segment").items()):
        images = crawl.get(shard_id)
        if images is None:
            logger.warning("segment shard %s has no crawl shard; skipping it", shard_id)
            continue
        tasks.append(caption_task(shard_id, entry, images))
    return tasks


def plan_corpus_rows(layout: RunLayout) -> list[ShardTask]:
    """One per-shard corpus task per caption shard, joined with its segment and crawl shards."""
    segment, crawl = layout.manifests("segment"), layout.manifests("crawl")
    tasks = []
    for shard_id, entry in sorted(layout.manifests("caption").items()):
        if shard_id not in segment or shard_id not in crawl:
            logger.warning("caption shard %s has no segment or crawl shard; skipping it", shard_id)
            continue
        tasks.append(corpus_task(shard_id, entry, segment[shard_id], crawl[shard_id]))
    return tasks


def summarise(
    layout: RunLayout,
    stage: str,
    reports: list[ShardReport],
    planned: int,
    wall_s: float,
    workers: int = 1,
    kept_rows: int | None = None,
    dedup: dict[str, Any] | None = None,
    fold: bool = True,
) -> StageRunResult:
    """The stage's result from its reports and its committed shards.

    ``fold``: first fold this execution's manifests into the stage index (``pipeline/shard_index.py``);
    off for a command that ran nothing and writes nothing.
    """
    if fold:
        layout.compact(stage)
    errors = layout.read_errors(stage).select(["category", "reason"]).to_pylist()
    output_rows = sum(m.output_rows for m in layout.manifests(stage).values())
    computed = [r for r in reports if r.status == "computed"]
    return StageRunResult(
        stage=stage,
        planned_shards=planned,
        skipped_shards=planned - len(reports),
        computed_shards=len(computed),
        failed_shards=sorted(r.shard_id for r in reports if r.status == "failed"),
        input_rows=sum(r.input_rows for r in computed),
        output_rows=output_rows,
        error_rows=len(errors),
        wall_s=wall_s,
        busy_s=sum(r.busy_s for r in computed),
        workers=workers,
        kept_rows=output_rows if kept_rows is None else kept_rows,
        errors_by_reason=dict(Counter(e["reason"] for e in errors if e["category"] == "failed")),
        filtered_by_reason=dict(Counter(e["reason"] for e in errors if e["category"] == "filtered")),
        dedup=dedup,
    )


# Stage command name -> the stages whose shards it writes, and the commands that depend on it.
STAGE_SHARDS = {"crawl": "crawl", "segment": "segment", "caption": "caption", "build-corpus": "corpus"}


# The shard stages of each branch, in order: the images', and the rendered PDF pages' (whose corpus rows
# "document-corpus" commits under corpus/ too), and those each command computes.
BRANCHES = (("crawl", "segment", "caption", "corpus"), ("render", "document-corpus"))
COMMAND_STAGES = {
    "crawl": ("crawl",),
    "segment": ("segment",),
    "caption": ("caption",),
    "render": ("render",),
    "build-corpus": ("corpus", "document-corpus"),
}


def forced_stages(force: set[str]) -> set[str]:
    """The shard stages that ``--force`` recomputes: each forced command's and those after them in their branch.

    ``--force segment`` recomputes segment, caption and the images' corpus rows, but not the rendered
    pages' corpus rows, which do not come from segment (before, every corpus shard was recomputed);
    ``--force render`` the render shards and the pages' rows only; ``--force build-corpus`` the rows of both.
    """
    unknown = force - set(COMMAND_STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {list(STAGE_ORDER)} and render")
    forced: set[str] = set()
    for command in force:
        for stage in COMMAND_STAGES[command]:
            branch = next(b for b in BRANCHES if stage in b)
            forced.update(branch[branch.index(stage) :])
    return forced


def _force_args(command: str, forced: set[str]) -> dict[str, bool]:
    """A stage runner's force arguments for the forced shard stages (build-corpus: one per branch)."""
    if command == "build-corpus":
        return {"force": "corpus" in forced, "force_documents": "document-corpus" in forced}
    return {"force": command in forced}


def _execute(
    config: RunConfig, layout: RunLayout, stage: str, tasks: list[ShardTask], force: bool = False
) -> list[ShardReport]:
    spec = stage_specs(config)[stage]
    stage_instance = spec.build()
    stage_instance.preflight()
    fingerprint = stage_instance.fingerprint()
    recompute_all = force or (tasks and tasks[0].mode != "compute")
    pending = tasks if recompute_all else pending_tasks(layout, tasks, fingerprint)
    logger.info("%s: %d shards planned, %d to compute", stage, len(tasks), len(pending))
    executor = make_executor(config.executor)
    reports = list(executor.run(spec, layout.storage, fingerprint, pending))
    _last_workers[stage] = max(1, executor.num_workers)
    return reports


# Workers used by the last execution of each stage in this process (for the summary's busy fraction).
_last_workers: dict[str, int] = {}


@dataclass
class ChainResult:
    """What a pipelined chain did (pipeline/pipelined.py), for the stage-by-stage pass that completes it."""

    started: float
    reports: dict[str, list[ShardReport]]  # shard stage -> reports of shards computed or failed
    seen: dict[str, set[str]]  # shard stage -> every shard the chain reported (skipped ones too)


def _execute_after(
    config: RunConfig,
    layout: RunLayout,
    stage: str,
    tasks: list[ShardTask],
    force: bool,
    chain: ChainResult | None,
) -> list[ShardReport]:
    """``_execute`` after a pipelined chain: the chain's reports, then what it did not finish.

    Shards the chain computed are fresh, so the usual skip check passes them over; checking them again
    (one manifest read each) also means that a task the chain built differently from this planner's
    would be recomputed here rather than trusted. Forced shards the chain already recomputed, and shards
    that failed in the chain (reported once, recomputed by the next run), are left out.
    """
    if chain is None:
        return _execute(config, layout, stage, tasks, force=force)
    reports = chain.reports.get(stage, [])
    failed = {r.shard_id for r in reports if r.status == "failed"}
    seen = chain.seen.get(stage, set())
    rest = [t for t in tasks if t.shard_id not in failed and not (force and t.shard_id in seen)]
    if not rest:
        return reports
    # _execute records its own executor's workers, 1 when it had nothing left to compute: keep the
    # chain's count when larger, or the summary's busy fraction would divide by one worker.
    chain_workers = _last_workers.get(stage, 1)
    reports = reports + _execute(config, layout, stage, rest, force=force)
    _last_workers[stage] = max(chain_workers, _last_workers.get(stage, 1))
    return reports


def plan_run_crawl(layout: RunLayout, config: RunConfig) -> list[ShardTask]:
    """Plan the crawl of ``config.sources``, then snapshot the config; sources without one item are refused.

    Without the check, a new run over an empty list (or one of blank lines and comments) "crawled" nothing
    and stopped at segment with "run 'ps3-engine crawl' first", after a crawl that had run. The snapshot
    comes after the check, so the refused root is not taken for a run (see run_crawl). A run root that
    already holds crawl shards goes on with them, as before.
    """
    tasks = plan_crawl(layout, config.sources, config.crawl.shard_size, config.s3)
    if not tasks and not layout.manifests("crawl"):
        raise ValueError(
            f"nothing to crawl: {', '.join(config.sources)} gave no items "
            "(an empty list, only blank lines and comments, or a folder without images)"
        )
    write_snapshot(layout, config)
    return tasks


def run_crawl(config: RunConfig, *, retry_failed: bool = False, force: bool = False) -> StageRunResult:
    """Crawl every planned shard that is not complete and fresh (or retry transient failures)."""
    started = time.perf_counter()
    if not retry_failed and not config.sources:
        # Checked before open_run: a crawl that cannot start must not leave a run.json behind, which later
        # commands given that run root would take for a run and continue from.
        raise ValueError("no crawl sources given: pass --input or set 'sources' in the run config")
    layout = open_run(config)
    if retry_failed:
        return _retry_crawl(config, layout, started)
    tasks = plan_run_crawl(layout, config)
    reports = _execute(config, layout, "crawl", tasks, force=force)
    return _finish_crawl(config, layout, len(tasks), reports, started)


def _retry_crawl(config: RunConfig, layout: RunLayout, started: float) -> StageRunResult:
    """``crawl --retry-failed``: recrawl the shards holding transient failures.

    The summary counts every committed crawl shard, the others as already done, as a plain rerun's does
    (before, its crawl entry counted only the retried shards). With nothing to retry nothing runs and
    nothing is written: before, the summary's crawl entry was replaced by one of zero shards and items.
    The result then has no computed and no failed shard (a retried shard is always one or the other).
    """
    tasks = _retry_tasks(layout)
    committed = layout.manifests("crawl")
    if tasks:
        reports = _execute(config, layout, "crawl", tasks)
        return _finish_crawl(config, layout, len(committed), reports, started)
    logger.info("crawl: nothing to retry (no transient failure recorded in %s)", config.run_root)
    output_rows = sum(entry.output_rows for entry in committed.values())
    kept_rows = output_rows - len(layout.dropped_item_ids())
    return summarise(
        layout, "crawl", [], len(committed), time.perf_counter() - started, kept_rows=kept_rows, fold=False
    )


def _finish_crawl(
    config: RunConfig, layout: RunLayout, planned: int, reports: list[ShardReport], started: float
) -> StageRunResult:
    """The run's dedup over the committed crawl shards, then the crawl's summary."""
    if config.crawl.dedup:
        dedup = run_dedup(layout, config.crawl.near_dup_max_distance, config.crawl.dedup_wave_shards)
    else:
        dedup = None
        # Drops of an earlier deduplicated run must not keep counting (or hiding images from segment).
        for key in (layout.DEDUP_KEY, layout.DEDUP_MANIFEST_KEY):
            if layout.storage.exists(key):
                layout.storage.delete(key)
    result = summarise(
        layout,
        "crawl",
        reports,
        planned,
        time.perf_counter() - started,
        _last_workers.get("crawl", 1),
        kept_rows=dedup.kept if dedup else None,
        dedup=asdict(dedup) if dedup else None,
    )
    write_summary(layout, [result], reports)
    return result


def _run_downstream_stage(
    config: RunConfig,
    stage: str,
    planner: Callable[[RunLayout], list[ShardTask]],
    needs: str,
    force: bool,
    chain: ChainResult | None = None,
) -> StageRunResult:
    """Plan ``stage`` from its committed upstream shards, compute what is missing or stale, summarise.

    After a pipelined chain (``chain``), only the shards the chain did not reach are computed here.
    """
    started = chain.started if chain else time.perf_counter()
    layout = open_run(config)
    write_snapshot(layout, config)
    tasks = planner(layout)
    if not tasks:
        raise ValueError(f"{config.run_root} has no {needs} shards for {stage}: run 'ps3-engine {needs}' first")
    reports = _execute_after(config, layout, stage, tasks, force, chain)
    result = summarise(layout, stage, reports, len(tasks), time.perf_counter() - started, _last_workers.get(stage, 1))
    write_summary(layout, [result], reports)
    return result


def run_segment(config: RunConfig, *, force: bool = False, chain: ChainResult | None = None) -> StageRunResult:
    """Propose regions for every crawl shard whose segment shard is missing or stale."""
    return _run_downstream_stage(config, "segment", plan_segment, "crawl", force, chain)


def run_caption(config: RunConfig, *, force: bool = False, chain: ChainResult | None = None) -> StageRunResult:
    """Caption the regions (and images) of every segment shard whose caption shard is missing or stale."""
    return _run_downstream_stage(config, "caption", plan_caption, "segment", force, chain)


def run_build_corpus(
    config: RunConfig,
    *,
    force: bool = False,
    force_documents: bool | None = None,
    chain: ChainResult | None = None,
) -> StageRunResult:
    """Per-shard corpus rows (incremental; images and rendered PDF pages), then the packed dataset.

    ``force`` recomputes the images' corpus rows, ``force_documents`` (default: ``force``) the pages'.
    """
    started = chain.started if chain else time.perf_counter()
    layout = open_run(config)
    write_snapshot(layout, config)
    tasks, document_tasks = plan_corpus_rows(layout), plan_document_corpus(layout)
    if not tasks and not document_tasks:
        raise ValueError(
            f"{config.run_root} has no caption or render shards for the corpus: run 'ps3-engine caption' first "
            "(or 'ps3-engine render' for PDFs)"
        )
    reports = _execute_after(config, layout, "corpus", tasks, force, chain) if tasks else []
    if document_tasks:  # rendered pages join the same corpus with source_type "document"
        forced = force if force_documents is None else force_documents
        reports += _execute(config, layout, "document-corpus", document_tasks, force=forced)
    dataset = build_corpus(
        layout,
        config.corpus,
        stage_fingerprints(config),
        use_ray=config.executor.kind == "ray",
        progress=config.executor.progress,
    )
    planned = len(tasks) + len(document_tasks)
    result = summarise(
        layout, "corpus", reports, planned, time.perf_counter() - started, _last_workers.get("corpus", 1)
    )
    result.stage = "build-corpus"
    result.dataset = {"rebuilt": dataset.rebuilt, "counts": dataset.counts, "root": layout.storage.uri("dataset")}
    write_summary(layout, [result], reports)
    return result


def plan_run_documents(layout: RunLayout, config: RunConfig, persist: bool = True) -> list[ShardTask]:
    """Plan the render of ``config.document_sources``; sources without one PDF are refused, as by
    :func:`plan_run_crawl` (before: the run stopped at build-corpus with "run 'ps3-engine caption' first")."""
    tasks = plan_documents(layout, config.document_sources, config.render.shard_size, config.s3, persist=persist)
    if not tasks and not layout.manifests("render"):
        raise ValueError(
            f"nothing to render: {', '.join(config.document_sources)} gave no PDFs "
            "(an empty list, only blank lines and comments, or a folder without .pdf files)"
        )
    return tasks


def run_render(config: RunConfig, *, force: bool = False) -> StageRunResult:
    """Rasterise the PDFs of ``document_sources`` into page rows with text-region captions."""
    started = time.perf_counter()
    layout = open_run(config)
    tasks = plan_run_documents(layout, config)
    write_snapshot(layout, config)  # after the check, so a refused root is not taken for a run
    reports = _execute(config, layout, "render", tasks, force=force)
    result = summarise(
        layout, "render", reports, len(tasks), time.perf_counter() - started, _last_workers.get("render", 1)
    )
    write_summary(layout, [result], reports)
    return result


def _retry_tasks(layout: RunLayout) -> list[ShardTask]:
    tasks = []
    for shard_id, entry in sorted(layout.manifests("crawl").items()):
        errors = layout.read_shard_errors("crawl", shard_id).column("transient").to_pylist()
        if any(errors):
            tasks.append(
                ShardTask(
                    "crawl",
                    shard_id,
                    RunLayout.crawl_input_key(shard_id),
                    entry.input_checksum,
                    tuple(entry.input_shards),
                    mode="retry_transient",
                )
            )
    return tasks


STAGE_RUNNERS = {
    "crawl": run_crawl,
    "segment": run_segment,
    "caption": run_caption,
    "build-corpus": run_build_corpus,
}


def run_pipelined(config: RunConfig, force: frozenset[str] = frozenset()) -> list[StageRunResult]:
    """Every image stage at once: crawl shards flow on to segment, caption and corpus rows (pipelined.py).

    Then a stage-by-stage pass completes what the chain did not reach (shards of earlier plans, shards
    lost with a worker), writes the dedup table and the summaries, and packs the dataset.
    """
    from ps3_engine.pipeline.pipelined import run_chain

    started = time.perf_counter()
    forced = forced_stages(set(force))
    if not config.sources:
        raise ValueError("no crawl sources given: pass --input or set 'sources' in the run config")
    layout = open_run(config)
    tasks = plan_run_crawl(layout, config)
    outcome = run_chain(config, layout, tasks, forced & set(BRANCHES[0]))
    _last_workers.update(outcome["workers"])
    chain = ChainResult(started, outcome["reports"], outcome["seen"])
    crawl_reports = _execute_after(config, layout, "crawl", tasks, "crawl" in forced, chain)
    results = [_finish_crawl(config, layout, len(tasks), crawl_reports, started)]
    results.append(run_segment(config, **_force_args("segment", forced), chain=chain))
    results.append(run_caption(config, **_force_args("caption", forced), chain=chain))
    if config.document_sources:
        results.append(run_render(config, **_force_args("render", forced)))
    results.append(run_build_corpus(config, **_force_args("build-corpus", forced), chain=chain))
    for result in results:
        if result.failed_shards:
            logger.error("%s: %d shards failed", result.stage, len(result.failed_shards))
    return results


def run_pipeline(
    config: RunConfig, stages: tuple[str, ...] = STAGE_ORDER, force: frozenset[str] = frozenset()
) -> list[StageRunResult]:
    """Run the requested stages in order; ``force`` stages (and their dependents) recompute every shard
    (:func:`forced_stages`: the dependents of a stage are those its items flow through).

    With ``executor.pipelined`` and every image stage requested, the stages stream into each other
    (:func:`run_pipelined`); otherwise each stage finishes before the next starts.
    """
    if config.sources and config.document_sources and "build-corpus" in stages:
        # Render runs after the image stages: an empty PDF source must stop the run before them, not after.
        plan_run_documents(open_run(config), config, persist=False)
    if config.executor.pipelined and config.sources and set(STAGE_ORDER) <= set(stages):
        return run_pipelined(config, force)
    forced = forced_stages(set(force))
    missing = [s for s in stages if s not in IMPLEMENTED_STAGES]
    if missing:
        logger.warning(
            "stages %s are not implemented yet; running %s", missing, [s for s in stages if s not in missing]
        )
    results = []
    documents_only = bool(config.document_sources) and not config.sources
    for stage in stages:
        if documents_only and stage in ("crawl", "segment", "caption"):
            continue
        if stage == "build-corpus" and config.document_sources:
            results.append(run_render(config, **_force_args("render", forced)))
        if stage in STAGE_RUNNERS:
            results.append(STAGE_RUNNERS[stage](config, **_force_args(stage, forced)))
            if results[-1].failed_shards:
                logger.error(
                    "%s: %d shards failed; later stages run on the rest", stage, len(results[-1].failed_shards)
                )
    return results


# The figures of the computation behind a stage's shards, which a rerun that computes nothing keeps.
COMPUTATION_FIELDS = (
    "planned_shards",
    "skipped_shards",
    "computed_shards",
    "input_rows",
    "wall_s",
    "busy_s",
    "workers",
    "throughput_rows_per_s",
    "busy_fraction",
)


def _summary_entry(result: StageRunResult, previous: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The stage's summary entry: this run's figures, or for a rerun that computed nothing the earlier ones.

    A rerun with every shard done (``ps3-engine segment`` twice) used to replace the stage's wall time,
    throughput and busy fraction with those of its skip check (near zero), which ``report`` then showed.
    Its counts (rows, errors, dedup, dataset) are still this run's; ``noop_rerun_at`` records it. A
    build-corpus that packed the dataset again did work, and is summarised as it is.
    """
    entry = result.to_dict()
    repacked = bool(result.dataset and result.dataset.get("rebuilt"))
    if previous is None or result.computed_shards or result.failed_shards or repacked:
        return entry
    return {**entry, **{k: previous[k] for k in COMPUTATION_FIELDS if k in previous}, "noop_rerun_at": now}


def write_summary(layout: RunLayout, results: list[StageRunResult], reports: list[ShardReport]) -> dict:
    """Update ``summary.json`` with these stages' results (other stages' entries are kept; a stage rerun
    that computed nothing keeps its entry's figures, :func:`_summary_entry`)."""
    summary: dict[str, Any] = {"stages": {}, "failed_shards": []}
    if layout.storage.exists(layout.SUMMARY_KEY):
        summary = layout.storage.read_json(layout.SUMMARY_KEY)
    updated = {r.stage for r in results}
    now = datetime.now(UTC).isoformat()
    summary["stages"].update({r.stage: _summary_entry(r, summary["stages"].get(r.stage), now) for r in results})
    # Failed shards under their command's name, as `status` looks them up and as `updated` holds it:
    # build-corpus writes "corpus" (and rendered pages') shards; under the shard stage's name they were
    # never counted by status and never cleared by a later, successful build-corpus.
    command = {shards: name for name, shards in STAGE_SHARDS.items()}
    summary["failed_shards"] = [f for f in summary.get("failed_shards", []) if f["stage"] not in updated] + [
        {"stage": command.get(r.stage, r.stage), "shard_id": r.shard_id, "message": r.message}
        for r in reports
        if r.status == "failed"
    ]
    summary["written_at"] = now
    layout.storage.write_json_atomic(layout.SUMMARY_KEY, summary)
    return summary

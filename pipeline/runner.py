"""Running stages over a run root: plan shards, skip what is complete and fresh, execute, summarise."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from infra.storage import Storage
from pipeline.config import RunConfig, snapshot
from pipeline.dedup import DedupOutcome, run_dedup
from pipeline.executor import make_executor
from pipeline.layout import RunLayout, ShardTask
from pipeline.shard_runner import ShardReport, StageSpec
from pipeline.sources import plan_crawl
from stages.crawl import CrawlStage

logger = logging.getLogger(__name__)

STAGE_ORDER = ("crawl", "segment", "caption", "build-corpus")
IMPLEMENTED_STAGES = ("crawl",)


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
    kept_rows: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    filtered_by_reason: dict[str, int] = field(default_factory=dict)
    dedup: dict[str, Any] | None = None

    @property
    def throughput_rows_per_s(self) -> float:
        return self.input_rows / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput_rows_per_s": round(self.throughput_rows_per_s, 3)}


def open_run(config: RunConfig) -> RunLayout:
    return RunLayout(Storage(config.run_root, config.s3))


def write_snapshot(layout: RunLayout, config: RunConfig, fingerprints: dict[str, str]) -> None:
    """Snapshot the resolved config; rewritten only when config or fingerprints changed."""
    fresh = snapshot(config, fingerprints)
    if layout.storage.exists(layout.RUN_CONFIG_KEY):
        previous = layout.storage.read_json(layout.RUN_CONFIG_KEY)
        if previous.get("config") == fresh["config"] and previous.get("fingerprints") == fresh["fingerprints"]:
            return
    layout.write_run_config(fresh)


def _pending(layout: RunLayout, tasks: list[ShardTask], fingerprint: str) -> list[ShardTask]:
    manifests = layout.manifests(tasks[0].stage) if tasks else {}
    return [t for t in tasks if layout.shard_state(t, fingerprint, manifests.get(t.shard_id)) != "done"]


def _crawl_spec(config: RunConfig) -> StageSpec:
    crawl_config = config.crawl
    if config.s3 != crawl_config.s3 and crawl_config.s3 == type(crawl_config.s3)():
        crawl_config = crawl_config.model_copy(update={"s3": config.s3})
    return StageSpec(CrawlStage, crawl_config)


def _summarise_crawl(
    layout: RunLayout, reports: list[ShardReport], planned: int, wall_s: float, dedup: DedupOutcome | None
) -> StageRunResult:
    errors = layout.read_errors("crawl").select(["category", "reason"]).to_pylist()
    manifests = layout.manifests("crawl")
    output_rows = sum(m.output_rows for m in manifests.values())
    computed = [r for r in reports if r.status == "computed"]
    return StageRunResult(
        stage="crawl",
        planned_shards=planned,
        skipped_shards=planned - len(reports),
        computed_shards=len(computed),
        failed_shards=sorted(r.shard_id for r in reports if r.status == "failed"),
        input_rows=sum(r.input_rows for r in computed),
        output_rows=output_rows,
        error_rows=len(errors),
        wall_s=wall_s,
        busy_s=sum(r.busy_s for r in computed),
        kept_rows=dedup.kept if dedup else output_rows,
        errors_by_reason=dict(Counter(e["reason"] for e in errors if e["category"] == "failed")),
        filtered_by_reason=dict(Counter(e["reason"] for e in errors if e["category"] == "filtered")),
        dedup=asdict(dedup) if dedup else None,
    )


def run_crawl(config: RunConfig, *, retry_failed: bool = False) -> StageRunResult:
    """Crawl every planned shard that is not complete and fresh (or retry transient failures)."""
    started = time.perf_counter()
    layout = open_run(config)
    spec = _crawl_spec(config)
    fingerprint = spec.build().fingerprint()
    if retry_failed:
        tasks = _retry_tasks(layout)
        pending = tasks
    else:
        write_snapshot(layout, config, {"crawl": fingerprint})
        tasks = plan_crawl(layout, config.sources, config.crawl.shard_size, config.s3)
        pending = _pending(layout, tasks, fingerprint)
    logger.info("crawl: %d shards planned, %d to compute", len(tasks), len(pending))
    executor = make_executor(config.executor)
    reports = list(executor.run(spec, layout.storage, fingerprint, pending))
    dedup = run_dedup(layout, config.crawl.near_dup_max_distance) if config.crawl.dedup else None
    result = _summarise_crawl(layout, reports, len(tasks), time.perf_counter() - started, dedup)
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


def run_pipeline(config: RunConfig, stages: tuple[str, ...] = STAGE_ORDER) -> list[StageRunResult]:
    """Run the requested stages in order. Stages not implemented yet are reported, not faked."""
    missing = [s for s in stages if s not in IMPLEMENTED_STAGES]
    if missing:
        logger.warning(
            "stages %s are not implemented yet; running %s", missing, [s for s in stages if s not in missing]
        )
    results = []
    if "crawl" in stages:
        results.append(run_crawl(config))
    return results


def write_summary(layout: RunLayout, results: list[StageRunResult], reports: list[ShardReport]) -> dict:
    summary = {
        "written_at": datetime.now(UTC).isoformat(),
        "stages": {r.stage: r.to_dict() for r in results},
        "failed_shards": [
            {"stage": r.stage, "shard_id": r.shard_id, "message": r.message} for r in reports if r.status == "failed"
        ],
    }
    layout.storage.write_json_atomic(layout.SUMMARY_KEY, summary)
    return summary

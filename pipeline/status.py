"""``ps3-engine status``: what a run root holds, per stage, read from manifests and plans alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.runner import plan_caption, plan_corpus_rows, plan_segment


@dataclass
class StageStatus:
    stage: str
    planned: int
    done: int
    stale: int
    missing: int
    failed: int
    rows: int
    error_rows: int
    errors_by_reason: dict[str, int] = field(default_factory=dict)


def _planned_crawl(layout: RunLayout) -> list[ShardTask]:
    tasks = []
    for obj in layout.storage.list("crawl/_input/"):
        with layout.storage.filesystem.open_input_file(layout.storage.path(obj.key)) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        shard_id = obj.key.rsplit("/", 1)[-1].removesuffix(".parquet")
        tasks.append(ShardTask("crawl", shard_id, obj.key, metadata.get(b"input_checksum", b"").decode(), ()))
    return tasks


def _stage_status(
    layout: RunLayout,
    stage: str,
    tasks: list[ShardTask],
    fingerprint: str | None,
    failed: int,
    rows_adjustment: int = 0,
) -> StageStatus:
    manifests = layout.manifests(stage)
    states = Counter(layout.shard_state(t, fingerprint or "", manifests.get(t.shard_id)) for t in tasks)
    reasons = layout.read_errors(stage).column("reason").to_pylist()
    return StageStatus(
        stage=stage,
        planned=len(tasks),
        done=states["done"],
        stale=states["stale"],
        missing=states["missing"],
        failed=failed,
        rows=sum(m.output_rows for m in manifests.values()) - rows_adjustment,
        error_rows=len(reasons),
        errors_by_reason=dict(Counter(reasons)),
    )


def run_status(run_root: str, s3: S3Settings | None = None) -> dict[str, Any]:
    layout = RunLayout(Storage(run_root, s3))
    if not layout.storage.exists(layout.RUN_CONFIG_KEY):
        raise FileNotFoundError(f"{run_root} is not a run root (no {layout.RUN_CONFIG_KEY})")
    fingerprints = layout.storage.read_json(layout.RUN_CONFIG_KEY).get("fingerprints", {})
    summary = layout.storage.read_json(layout.SUMMARY_KEY) if layout.storage.exists(layout.SUMMARY_KEY) else {}
    failed = Counter(f["stage"] for f in summary.get("failed_shards", []))
    stages = {
        "crawl": _stage_status(
            layout,
            "crawl",
            _planned_crawl(layout),
            fingerprints.get("crawl"),
            failed["crawl"],
            rows_adjustment=len(layout.dropped_item_ids()),
        ),
    }
    segment_tasks = plan_segment(layout)
    if segment_tasks and (layout.manifests("segment") or "segment" in summary.get("stages", {})):
        stages["segment"] = _stage_status(
            layout, "segment", segment_tasks, fingerprints.get("segment"), failed["segment"]
        )
    for stage, name, planner in (
        ("caption", "caption", plan_caption),
        ("corpus", "build-corpus", plan_corpus_rows),
    ):
        tasks = planner(layout)
        if tasks and (layout.manifests(stage) or name in summary.get("stages", {})):
            stages[name] = _stage_status(layout, stage, tasks, fingerprints.get(stage), failed[name])
    dataset = layout.storage.read_json(DATASET_MANIFEST_KEY) if layout.storage.exists(DATASET_MANIFEST_KEY) else None
    return {"run_root": run_root, "stages": stages, "summary": summary, "dataset": dataset}

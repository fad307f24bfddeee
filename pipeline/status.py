"""``ps3-engine status``: what a run root holds, per stage, read from manifests, plans and in-progress records.

A stage's state is one of:
``done`` every planned shard committed and fresh; ``running`` a driver is computing shards now (its
heartbeat is recent); ``interrupted`` a driver started shards and stopped without finishing (killed);
``failed`` shards failed in the last run; ``partial`` some shards committed, others missing;
``stale`` committed shards whose input or config changed; ``not run`` nothing committed.
During a forced recompute, a shard counts as done only once it is committed again.

Cost on a large run (S3): per stage one listing of its manifests, its index parts, the manifests not yet
folded into the index, one listing of its files (sizes); for crawl one listing of its planned inputs and
the checksums of only those inputs written after their shard's commit. No request per shard otherwise.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.storage import ObjectInfo, S3Settings, Storage
from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.documents import plan_document_corpus
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.run_state import RunningRecord, read_running
from ps3_engine.pipeline.runner import plan_caption, plan_corpus_rows, plan_segment
from ps3_engine.pipeline.shard_index import list_manifests, parallel_map


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
    state: str = "not run"
    running: int = 0  # shards of an in-progress (or interrupted) computation not committed again yet
    started_at: str | None = None


def _state(status: StageStatus, record: RunningRecord | None) -> str:
    if record is not None:
        return "running" if record.is_alive() else "interrupted"
    if status.failed:
        return "failed"
    if status.planned and status.done == status.planned:
        return "done"
    if status.done:
        return "partial"
    return "stale" if status.stale else "not run"


def describe_stage(status: StageStatus) -> str:
    """One status line: state, shard counts, rows and errors."""
    shards = f"shards {status.done} done"
    if status.running:
        shards += f", {status.running} {'in progress' if status.state == 'running' else 'unfinished'}"
    shards += f", {status.stale} stale, {status.missing} missing, {status.failed} failed (of {status.planned})"
    since = f" since {status.started_at[:19].replace('T', ' ')} UTC" if status.started_at else ""
    return (
        f"{status.state:11s}{since} {shards}; rows {status.rows}; errors {status.error_rows} "
        f"{status.errors_by_reason or ''}"
    ).rstrip()


def _input_checksum(layout: RunLayout, key: str) -> str:
    """The checksum the planner stored in an input shard's Parquet metadata."""
    metadata = pq.read_schema(pa.BufferReader(layout.storage.read_bytes(key))).metadata or {}
    return metadata.get(b"input_checksum", b"").decode()


def _planned_inputs(layout: RunLayout, stage: str = "crawl") -> list[ShardTask]:
    """The planned shards of a stage with planned inputs (crawl, render), with their current input's checksum.

    An input written before its shard's manifest (both times from one clock: the object store's or the
    file system's) is the one that shard was computed from, so its checksum is the manifest's: only
    inputs without a manifest older than them are read (re-planned inputs, and those of the last
    second). Inputs without a manifest need no checksum: their shard is missing whatever it is.
    """
    state = layout.stage_state(stage)
    tasks: dict[str, ShardTask] = {}
    to_read: list[ObjectInfo] = []
    for obj in layout.storage.list_versions(f"{stage}/_input/", recursive=False):
        if not obj.key.endswith(".parquet"):
            continue
        shard_id = obj.key.rsplit("/", 1)[-1].removesuffix(".parquet")
        entry, committed = state.entries.get(shard_id), state.listed.get(shard_id)
        if entry is None:
            tasks[shard_id] = ShardTask(stage, shard_id, obj.key, "", ())
        elif obj.modified and committed and committed.modified and obj.modified < committed.modified:
            tasks[shard_id] = ShardTask(stage, shard_id, obj.key, entry.input_checksum, ())
        else:
            to_read.append(obj)
    for obj, checksum in zip(to_read, parallel_map(lambda o: _input_checksum(layout, o.key), to_read), strict=True):
        shard_id = obj.key.rsplit("/", 1)[-1].removesuffix(".parquet")
        tasks[shard_id] = ShardTask(stage, shard_id, obj.key, checksum, ())
    return [tasks[shard_id] for shard_id in sorted(tasks)]


def _stage_status(
    layout: RunLayout,
    stage: str,
    tasks: list[ShardTask],
    fingerprint: str | None,
    failed: int,
    rows_adjustment: int = 0,
    record: RunningRecord | None = None,
) -> StageStatus:
    manifests = layout.manifests(stage)
    in_progress = set(record.shard_ids) if record is not None else set()
    states: Counter[str] = Counter()
    running = 0
    for task in tasks:
        entry = manifests.get(task.shard_id)
        # A shard being recomputed is not done until committed again, however fresh its old manifest.
        if task.shard_id in in_progress and (entry is None or _before(entry.created_at, record.started)):
            running += 1
        else:
            states[layout.shard_state(task, fingerprint or "", entry)] += 1
    reasons: Counter[str] = Counter()
    for (_category, reason), rows in layout.error_counts(stage).items():
        reasons[reason] += rows
    status = StageStatus(
        stage=stage,
        planned=len(tasks),
        done=states["done"],
        stale=states["stale"],
        missing=states["missing"] + states["damaged"],  # damaged: files unlike the manifest, recomputed
        failed=failed,
        rows=sum(m.output_rows for m in manifests.values()) - rows_adjustment,
        error_rows=sum(reasons.values()),
        errors_by_reason=dict(reasons),
        running=running,
        started_at=record.started_at if record is not None else None,
    )
    status.state = _state(status, record)
    return status


def _before(created_at: datetime, started: datetime) -> bool:
    if created_at.tzinfo is None:  # manifests are written in UTC
        created_at = created_at.replace(tzinfo=started.tzinfo)
    return created_at < started


def run_status(run_root: str, s3: S3Settings | None = None) -> dict[str, Any]:
    # Read-only: each stage's state is read once, however many planners ask for it.
    layout = RunLayout(Storage(run_root, s3), read_only=True)
    if not layout.storage.exists(layout.RUN_CONFIG_KEY):
        raise FileNotFoundError(f"{run_root} is not a run root (no {layout.RUN_CONFIG_KEY})")
    fingerprints = layout.storage.read_json(layout.RUN_CONFIG_KEY).get("fingerprints", {})
    layout.prefetch(["crawl", "segment", "caption", "corpus"])
    summary = layout.storage.read_json(layout.SUMMARY_KEY) if layout.storage.exists(layout.SUMMARY_KEY) else {}
    failed = Counter(f["stage"] for f in summary.get("failed_shards", []))
    running = read_running(layout.storage)
    stages = {
        "crawl": _stage_status(
            layout,
            "crawl",
            _planned_inputs(layout),
            fingerprints.get("crawl"),
            failed["crawl"],
            rows_adjustment=len(layout.dropped_item_ids()),
            record=running.get("crawl"),
        ),
    }
    segment_tasks = plan_segment(layout)
    if segment_tasks and (
        layout.manifests("segment") or "segment" in summary.get("stages", {}) or "segment" in running
    ):
        stages["segment"] = _stage_status(
            layout,
            "segment",
            segment_tasks,
            fingerprints.get("segment"),
            failed["segment"],
            record=running.get("segment"),
        )
    for stage, name, planner in (
        ("caption", "caption", plan_caption),
        ("render", "render", lambda layout: _planned_inputs(layout, "render")),
        ("corpus", "build-corpus", plan_corpus_rows),
    ):
        # The document branch's render only where it ran: it has shards, or a summary or in-progress record
        # says so (an image-only run lists one empty folder more, reads nothing more). Before, the render
        # shards of a run whose summary had no render entry (lost, or written by an older version) and
        # their pages' corpus shards went unlisted.
        if stage == "render" and not (
            "render" in summary.get("stages", {}) or "render" in running or list_manifests(layout.storage, "render")
        ):
            continue
        tasks = planner(layout)
        # Rendered pages' corpus shards (their own fingerprint) count towards build-corpus too: before, a
        # documents-only run's build-corpus said "not run", a mixed run's left its document shards out.
        documents = plan_document_corpus(layout) if stage == "corpus" and "render" in stages else []
        if (tasks or documents) and (layout.manifests(stage) or name in summary.get("stages", {}) or stage in running):
            record = running.get(stage)
            status = _stage_status(layout, stage, tasks, fingerprints.get(stage), failed[name], record=record)
            if documents:
                pages = _stage_status(layout, stage, documents, fingerprints.get("document-corpus"), 0, record=record)
                for counted in ("planned", "done", "stale", "missing", "running"):
                    setattr(status, counted, getattr(status, counted) + getattr(pages, counted))
                status.state = _state(status, record)
            stages[name] = status
    dataset = layout.storage.read_json(DATASET_MANIFEST_KEY) if layout.storage.exists(DATASET_MANIFEST_KEY) else None
    return {"run_root": run_root, "stages": stages, "summary": summary, "dataset": dataset}

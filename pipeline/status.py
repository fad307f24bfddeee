"""``ps3-engine status``: what a run root holds, per stage, read from manifests alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from infra.storage import S3Settings, Storage
from pipeline.layout import RunLayout


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


def _input_checksums(layout: RunLayout) -> dict[str, str]:
    checksums = {}
    for obj in layout.storage.list("crawl/_input/"):
        with layout.storage.filesystem.open_input_file(layout.storage.path(obj.key)) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        shard_id = obj.key.rsplit("/", 1)[-1].removesuffix(".parquet")
        checksums[shard_id] = metadata.get(b"input_checksum", b"").decode()
    return checksums


def run_status(run_root: str, s3: S3Settings | None = None) -> dict[str, Any]:
    layout = RunLayout(Storage(run_root, s3))
    if not layout.storage.exists(layout.RUN_CONFIG_KEY):
        raise FileNotFoundError(f"{run_root} is not a run root (no {layout.RUN_CONFIG_KEY})")
    run = layout.storage.read_json(layout.RUN_CONFIG_KEY)
    summary = layout.storage.read_json(layout.SUMMARY_KEY) if layout.storage.exists(layout.SUMMARY_KEY) else {}
    failed = Counter(f["stage"] for f in summary.get("failed_shards", []))
    stages = {}
    fingerprint = run.get("fingerprints", {}).get("crawl")
    planned = _input_checksums(layout)
    manifests = layout.manifests("crawl")
    states = Counter()
    for shard_id, checksum in planned.items():
        entry = manifests.get(shard_id)
        if entry is None:
            states["missing"] += 1
        elif entry.input_checksum != checksum or entry.config_fingerprint != fingerprint:
            states["stale"] += 1
        else:
            states["done"] += 1
    errors = layout.read_errors("crawl").column("reason").to_pylist()
    dropped = len(layout.dropped_item_ids())
    stages["crawl"] = StageStatus(
        stage="crawl",
        planned=len(planned),
        done=states["done"],
        stale=states["stale"],
        missing=states["missing"],
        failed=failed["crawl"],
        rows=sum(m.output_rows for m in manifests.values()) - dropped,
        error_rows=len(errors),
        errors_by_reason=dict(Counter(errors)),
    )
    return {"run_root": run_root, "stages": stages, "summary": summary}

"""A finished run of N items, metadata only, written fast: the subject of the run-state figures.

Every stage (crawl, segment, caption, corpus) has one committed shard per crawl shard of 128-256 items,
with what a real commit leaves: the crawl input (``crawl/_input``, with its checksum in the Parquet
metadata), the output and errors files, and the manifest JSON exactly as ``RunLayout.commit_shard``
writes it; then the crawl's dedup drops (5% of items) and ``run.json``. Each stage is compacted into its
index before the next is planned with the real planners (``plan_segment`` ...), so the tasks' input
checksums are the ones ``plan``/``status``/a rerun compute. Output files are a small real Parquet file
per stage, shared by all shards (their sizes are what ``status`` checks; their rows are not read).

Objects are put directly, many at once (one request each), instead of through the atomic
temp-copy-delete commit (three requests each): the setup is not what is measured.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.storage import Storage, parquet_bytes, sha256_hex
from ps3_engine.pipeline.config import RunConfig, snapshot
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.runner import plan_caption, plan_corpus_rows, plan_segment, stage_fingerprints
from ps3_engine.schemas import ERROR_SCHEMA, ManifestEntry
from ps3_engine.schemas.manifest import SCHEMA_VERSION

logger = logging.getLogger(__name__)

STAGES = ("crawl", "segment", "caption", "corpus")
INPUT_CHECKSUM = "synthetic-input"


_clients: dict[str, Any] = {}


def _client(storage: Storage) -> Any:
    """A boto3 client with a connection per writer thread (the Storage's keeps 10, and warns past them)."""
    if storage.root_uri not in _clients:
        import boto3
        from botocore.config import Config

        _clients[storage.root_uri] = boto3.client(
            "s3",
            endpoint_url=storage.s3.resolved_endpoint(),
            region_name=storage.s3.resolved_region(),
            config=Config(max_pool_connections=64, retries={"max_attempts": 8, "mode": "standard"}),
        )
    return _clients[storage.root_uri]


def put(storage: Storage, key: str, data: bytes | memoryview) -> None:
    """One plain write (S3: one PutObject, 4x faster here than pyarrow's stream): no atomic commit."""
    if storage.is_s3:
        bucket, _, base = storage.base_path.partition("/")
        _client(storage).put_object(Bucket=bucket, Key=f"{base}/{key}" if base else key, Body=bytes(data))
        return
    path = Path(storage.path(key))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _errors_file(stage: str, reasons: list[str]) -> bytes:
    now = datetime.now(UTC)
    rows = [
        {
            "item_id": f"{stage}-err-{i}",
            "stage": stage,
            "shard_id": "template",
            "input_ref": f"https://img{i}.example.com/x.jpg",
            "category": "failed",
            "reason": reason,
            "transient": False,
            "message": "synthetic",
            "attempts": 1,
            "created_at": now,
        }
        for i, reason in enumerate(reasons)
    ]
    return bytes(parquet_bytes(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)))


class SyntheticRun:
    """Writes one synthetic finished run (see the module docstring); ``written`` counts objects per stage."""

    def __init__(
        self, storage: Storage, num_items: int, seed: int = 0, threads: int = 32, straggler_pause_s: float = 1.1
    ) -> None:
        self.storage = storage
        self.straggler_pause_s = straggler_pause_s
        self.layout = RunLayout(storage)
        self.threads = threads
        rng = random.Random(seed)
        self.shard_items: dict[str, int] = {}
        total, index = 0, 0
        while total < num_items:
            size = min(rng.randint(128, 256), num_items - total)
            self.shard_items[f"syn-{index:07d}"] = size
            total, index = total + size, index + 1
        self.config = RunConfig(run_root=storage.root_uri)
        self.fingerprints = stage_fingerprints(self.config)
        self.written: dict[str, int] = dict.fromkeys(STAGES, 0)

    def _parallel(self, fn: Callable[[Any], None], items: list[Any]) -> None:
        with ThreadPoolExecutor(self.threads) as pool:
            for _ in pool.map(fn, items):
                pass

    def write(self) -> None:
        self._write_inputs()
        crawl = [ShardTask("crawl", s, RunLayout.crawl_input_key(s), INPUT_CHECKSUM, ()) for s in self.shard_items]
        self._commit_stage("crawl", crawl)
        self._write_dedup()
        for stage, planner in (("segment", plan_segment), ("caption", plan_caption), ("corpus", plan_corpus_rows)):
            self._commit_stage(stage, planner(self.layout))
        put(self.storage, RunLayout.RUN_CONFIG_KEY, json.dumps(snapshot(self.config, self.fingerprints)).encode())

    def _write_inputs(self) -> None:
        table = pa.table({"item_id": [f"item-{i}" for i in range(256)]})
        table = table.replace_schema_metadata({"input_checksum": INPUT_CHECKSUM})
        data = bytes(parquet_bytes(table))
        self._parallel(lambda shard: put(self.storage, RunLayout.crawl_input_key(shard), data), list(self.shard_items))
        self.written["crawl"] += len(self.shard_items)

    def _commit_stage(self, stage: str, tasks: list[ShardTask]) -> None:
        output = bytes(parquet_bytes(pa.table({"item_id": [f"{stage}-{i}" for i in range(256)]})))
        reasons = {"crawl": ["http_404", "timeout", "too_small"], "caption": ["decode_error"]}.get(stage, [])
        errors = _errors_file(stage, reasons)
        counts = {"failed": dict.fromkeys(reasons, 1)} if reasons else {}
        fingerprint = self.fingerprints[stage]
        now = datetime.now(UTC)

        def commit(task: ShardTask) -> None:
            entry = ManifestEntry(
                stage=stage,
                shard_id=task.shard_id,
                input_shards=list(task.input_shards) or [task.shard_id],
                input_checksum=task.input_checksum,
                config_fingerprint=fingerprint,
                output_key=RunLayout.output_key(stage, task.shard_id),
                output_rows=self.shard_items[task.shard_id] - len(reasons),
                output_checksum=sha256_hex(output),
                output_bytes=len(output),
                errors_key=RunLayout.errors_key(stage, task.shard_id),
                error_rows=len(reasons),
                errors_checksum=sha256_hex(errors),
                errors_bytes=len(errors),
                attempt=1,
                schema_version=SCHEMA_VERSION,
                created_at=now,
                wall_seconds=1.0,
            )
            put(self.storage, entry.output_key, output)
            put(self.storage, entry.errors_key, errors)
            record = {**entry.model_dump(mode="json"), "error_counts": counts}
            put(self.storage, RunLayout.manifest_key(stage, task.shard_id), json.dumps(record, indent=2).encode())

        self._parallel(commit, tasks[:-1])
        # The last shard commits a second after the rest, as a straggler does: compaction folds the
        # manifests written before the newest one (S3 write times are whole seconds), so only it stays out.
        time.sleep(self.straggler_pause_s)
        commit(tasks[-1])
        self.written[stage] += 3 * len(tasks)
        compaction = self.layout.compact(stage)
        assert compaction is not None and compaction.folded == len(tasks) - 1, compaction
        self.written[stage] += compaction.objects_written
        logger.info("%s: %d shards committed and compacted", stage, len(tasks))

    def _write_dedup(self) -> None:
        rng = random.Random(1)
        item_ids, shard_ids = [], []
        for shard, items in self.shard_items.items():
            for row in rng.sample(range(items), items // 20):
                item_ids.append(f"{shard}-{row:03d}")
                shard_ids.append(shard)
        count = len(item_ids)
        table = pa.table(
            {
                "item_id": item_ids,
                "stage": ["crawl"] * count,
                "shard_id": shard_ids,
                "input_ref": [""] * count,
                "category": ["filtered"] * count,
                "reason": ["duplicate"] * count,
                "transient": [False] * count,
                "message": ["near duplicate of an earlier image"] * count,
                "attempts": pa.array([1] * count, pa.int16()),
                "created_at": pa.array([datetime.now(UTC)] * count, pa.timestamp("us", tz="UTC")),
            },
            schema=ERROR_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        put(self.storage, RunLayout.DEDUP_KEY, sink.getvalue().to_pybytes())
        self.written["crawl"] += 1

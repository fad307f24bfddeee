"""Run layout: where every stage's shards, errors and manifests live under a run root.

```
run.json                          resolved config snapshot, versions, per-stage fingerprints
<stage>/part-<shard>.parquet      output rows of one shard
<stage>/errors/part-<shard>.parquet
<stage>/_manifest/<shard>.json    completion record, written last
crawl/_input/<shard>.parquet      planned crawl items of one shard
crawl/_dedup/dropped.parquet      cross-shard duplicates (error rows, category "filtered")
summary.json                      per-stage counts, errors by reason, wall time, throughput
```
A shard is complete when its manifest exists and the files it names exist with the recorded sizes;
it is fresh when the manifest's input checksum and config fingerprint equal the current ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa

from ps3_engine.infra.storage import Storage
from ps3_engine.schemas import ERROR_SCHEMA, ManifestEntry
from ps3_engine.schemas.manifest import SCHEMA_VERSION as MANIFEST_SCHEMA_VERSION

logger = logging.getLogger(__name__)

ShardState = Literal["done", "stale", "missing"]


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: produce ``shard_id`` of ``stage`` from ``input_key`` (checksummed)."""

    stage: str
    shard_id: str
    input_key: str
    input_checksum: str
    input_shards: tuple[str, ...]
    # "compute" builds the shard from its whole input; "retry_transient" re-runs only the items whose
    # recorded error is transient and merges them into the committed shard.
    mode: str = "compute"
    # Input rows to skip (e.g. images dropped by the crawl's cross-shard dedup); part of the checksum.
    exclude_item_ids: tuple[str, ...] = ()
    # Further inputs the stage joins onto ``input_key`` (e.g. the crawl shard holding a region shard's
    # images); their checksums are folded into ``input_checksum`` by the planner.
    side_input_keys: tuple[str, ...] = ()


class RunLayout:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # -- keys ----------------------------------------------------------------------------------
    RUN_CONFIG_KEY = "run.json"
    SUMMARY_KEY = "summary.json"

    @staticmethod
    def output_key(stage: str, shard_id: str) -> str:
        return f"{stage}/part-{shard_id}.parquet"

    @staticmethod
    def errors_key(stage: str, shard_id: str) -> str:
        return f"{stage}/errors/part-{shard_id}.parquet"

    @staticmethod
    def manifest_key(stage: str, shard_id: str) -> str:
        return f"{stage}/_manifest/{shard_id}.json"

    @staticmethod
    def crawl_input_key(shard_id: str) -> str:
        return f"crawl/_input/{shard_id}.parquet"

    DEDUP_KEY = "crawl/_dedup/dropped.parquet"
    DEDUP_MANIFEST_KEY = "crawl/_dedup/_manifest.json"

    # -- manifests -----------------------------------------------------------------------------
    def read_manifest(self, stage: str, shard_id: str) -> ManifestEntry | None:
        key = self.manifest_key(stage, shard_id)
        if not self.storage.exists(key):
            return None
        return ManifestEntry.model_validate(self.storage.read_json(key))

    def manifests(self, stage: str) -> dict[str, ManifestEntry]:
        prefix = f"{stage}/_manifest/"
        entries = {}
        for obj in self.storage.list(prefix):
            entry = ManifestEntry.model_validate_json(self.storage.read_bytes(obj.key))
            entries[entry.shard_id] = entry
        return entries

    def shard_state(self, task: ShardTask, fingerprint: str, entry: ManifestEntry | None) -> ShardState:
        if entry is None or not self.storage.exists(entry.output_key) or not self.storage.exists(entry.errors_key):
            return "missing"
        if entry.input_checksum != task.input_checksum or entry.config_fingerprint != fingerprint:
            return "stale"
        return "done"

    def commit_shard(
        self,
        task: ShardTask,
        *,
        fingerprint: str,
        output: pa.Table,
        errors: pa.Table,
        attempt: int,
        wall_seconds: float,
    ) -> ManifestEntry:
        """Write output and errors (each atomically), then the manifest entry that makes them count."""
        output_key = self.output_key(task.stage, task.shard_id)
        errors_key = self.errors_key(task.stage, task.shard_id)
        output_checksum = self.storage.write_parquet_atomic(output_key, output)
        errors_checksum = self.storage.write_parquet_atomic(errors_key, errors)
        entry = ManifestEntry(
            stage=task.stage,
            shard_id=task.shard_id,
            input_shards=list(task.input_shards),
            input_checksum=task.input_checksum,
            config_fingerprint=fingerprint,
            output_key=output_key,
            output_rows=output.num_rows,
            output_checksum=output_checksum,
            errors_key=errors_key,
            error_rows=errors.num_rows,
            errors_checksum=errors_checksum,
            attempt=attempt,
            schema_version=MANIFEST_SCHEMA_VERSION,
            created_at=datetime.now(UTC),
            wall_seconds=wall_seconds,
        )
        self.storage.write_bytes_atomic(
            self.manifest_key(task.stage, task.shard_id), entry.model_dump_json(indent=2).encode()
        )
        return entry

    # -- reading results -----------------------------------------------------------------------
    def read_output(self, stage: str, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        return self.storage.read_parquet(self.output_key(stage, shard_id), columns=columns)

    def read_shard_errors(self, stage: str, shard_id: str) -> pa.Table:
        return self.storage.read_parquet(self.errors_key(stage, shard_id))

    def read_errors(self, stage: str) -> pa.Table:
        """The stage's whole errors table: per-shard error files plus, for crawl, dedup drops."""
        tables = [self.read_shard_errors(stage, shard) for shard in sorted(self.manifests(stage))]
        if stage == "crawl" and self.storage.exists(self.DEDUP_KEY):
            tables.append(self.storage.read_parquet(self.DEDUP_KEY))
        if not tables:
            return ERROR_SCHEMA.empty_table()
        return pa.concat_tables([t.cast(ERROR_SCHEMA) for t in tables])

    def dropped_item_ids(self) -> set[str]:
        if not self.storage.exists(self.DEDUP_KEY):
            return set()
        return set(self.storage.read_parquet(self.DEDUP_KEY, columns=["item_id"]).column("item_id").to_pylist())

    def write_run_config(self, snapshot: dict) -> None:
        self.storage.write_bytes_atomic(self.RUN_CONFIG_KEY, json.dumps(snapshot, indent=2, default=str).encode())

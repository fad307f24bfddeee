"""Run layout: where every stage's shards, errors and manifests live under a run root.

```
run.json                          resolved config snapshot, versions, per-stage fingerprints
<stage>/part-<shard>.parquet      output rows of one shard
<stage>/errors/part-<shard>.parquet
<stage>/_manifest/<shard>.json    completion record, written last
crawl/_input/<shard>.parquet      planned crawl items of one shard
crawl/_dedup/dropped.parquet      cross-shard duplicates (error rows, category "filtered")
crawl/_dedup/index-<fp>.parquet   the dedup's per-row hash index, named by crawl/_dedup/_manifest.json
summary.json                      per-stage counts, errors by reason, wall time, throughput
```
A shard is complete when its manifest exists and the files it names exist with the recorded sizes
(checked on every rerun; ``status --check`` also compares checksums); it is fresh when the
manifest's input checksum and config fingerprint equal the current ones. A shard whose files differ
from its manifest, or whose manifest is unreadable, is recomputed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa
from pydantic import ValidationError

from ps3_engine.infra.storage import Storage, StorageError, parquet_bytes
from ps3_engine.schemas import ERROR_SCHEMA, ManifestEntry
from ps3_engine.schemas.error import redact_error_table
from ps3_engine.schemas.manifest import SCHEMA_VERSION as MANIFEST_SCHEMA_VERSION

logger = logging.getLogger(__name__)

ShardState = Literal["done", "stale", "missing", "damaged"]


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
        """The shard's completion record; None when it is absent or damaged (then the shard is not done)."""
        key = self.manifest_key(stage, shard_id)
        if not self.storage.exists(key):
            return None
        return self._parse_manifest(key, self.storage.read_bytes(key))

    def manifests(self, stage: str) -> dict[str, ManifestEntry]:
        """All readable completion records of ``stage`` by shard id (damaged ones are logged and left out)."""
        prefix = f"{stage}/_manifest/"
        entries = {}
        for obj in self.storage.list(prefix):
            entry = self._parse_manifest(obj.key, self.storage.read_bytes(obj.key))
            if entry is not None:
                entries[entry.shard_id] = entry
        return entries

    def _parse_manifest(self, key: str, data: bytes) -> ManifestEntry | None:
        try:
            return ManifestEntry.model_validate_json(data)
        except ValidationError as exc:
            # A manifest is written last and atomically, so a broken one means damage after the fact (a
            # truncated copy, a hand edit): its shard is recomputed rather than the whole run blocked.
            problem = exc.errors()[0]["msg"]
            logger.warning(
                "%s is damaged (%d bytes: %s): its shard counts as not done", self.storage.uri(key), len(data), problem
            )
            return None

    def damage(self, entry: ManifestEntry) -> tuple[ShardState, str] | None:
        """``("missing" | "damaged", why)`` when a committed shard's files do not match its manifest, else None.

        The cheap check of every rerun and ``status``: each file exists with the size the manifest
        recorded (one metadata request per file). Full checksums are ``status --check``'s job
        (:mod:`ps3_engine.pipeline.verify`).
        """
        for key, recorded in ((entry.output_key, entry.output_bytes), (entry.errors_key, entry.errors_bytes)):
            found = self.storage.info(key)
            if found is None:
                return "missing", f"{self.storage.uri(key)} is missing"
            if recorded is not None and found.size != recorded:
                return "damaged", f"{self.storage.uri(key)} is {found.size} bytes but its manifest recorded {recorded}"
        return None

    def shard_state(self, task: ShardTask, fingerprint: str, entry: ManifestEntry | None) -> ShardState:
        """``done``, ``stale`` (input or config changed), ``missing`` or ``damaged`` (files unlike the manifest)."""
        if entry is None:
            return "missing"
        problem = self.damage(entry)
        if problem is not None:
            state, why = problem
            logger.warning("%s shard %s is %s: %s; it will be recomputed", task.stage, task.shard_id, state, why)
            return state
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
        """Write output and errors (each atomically), then the manifest entry that makes them count.

        Error messages and references are stripped of secrets here (:func:`redact_error_table`), the one
        place every stage's error rows pass through on their way to storage.
        """
        output_key = self.output_key(task.stage, task.shard_id)
        errors_key = self.errors_key(task.stage, task.shard_id)
        output_data = parquet_bytes(output)
        errors_data = parquet_bytes(redact_error_table(errors))
        output_checksum = self.storage.write_bytes_atomic(output_key, output_data)
        errors_checksum = self.storage.write_bytes_atomic(errors_key, errors_data)
        entry = ManifestEntry(
            stage=task.stage,
            shard_id=task.shard_id,
            input_shards=list(task.input_shards),
            input_checksum=task.input_checksum,
            config_fingerprint=fingerprint,
            output_key=output_key,
            output_rows=output.num_rows,
            output_checksum=output_checksum,
            output_bytes=len(output_data),
            errors_key=errors_key,
            error_rows=errors.num_rows,
            errors_checksum=errors_checksum,
            errors_bytes=len(errors_data),
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
        tables = []
        for shard in sorted(self.manifests(stage)):
            try:
                tables.append(self.read_shard_errors(stage, shard))
            except (StorageError, FileNotFoundError) as exc:  # damaged: the next rerun recomputes the shard
                logger.warning("%s shard %s: errors not counted: %s", stage, shard, exc)
        if stage == "crawl" and self.storage.exists(self.DEDUP_KEY):
            tables.append(self.storage.read_parquet(self.DEDUP_KEY))
        if not tables:
            return ERROR_SCHEMA.empty_table()
        return pa.concat_tables([t.cast(ERROR_SCHEMA) for t in tables])

    def excluded_items(self) -> dict[str, list[str]]:
        """Crawl rows that later stages skip, by crawl shard id (item ids in row order).

        The dedup's drops when it ran. Without it (``crawl.dedup=false``), every row whose image id an
        earlier row (shard, then row order) already holds: the same bytes fetched twice are one image,
        and an image must enter segment once, or it is captioned and packed once per copy.
        """
        excluded: dict[str, list[str]] = {}
        if self.storage.exists(self.DEDUP_KEY):
            for row in self.storage.read_parquet(self.DEDUP_KEY, columns=["shard_id", "item_id"]).to_pylist():
                excluded.setdefault(row["shard_id"], []).append(row["item_id"])
            return excluded
        seen: set[str] = set()
        for shard_id, entry in sorted(self.manifests("crawl").items()):
            for row in self.storage.read_parquet(entry.output_key, columns=["item_id", "image_id"]).to_pylist():
                item_id, image_id = row["item_id"], row["image_id"]
                if image_id in seen:
                    excluded.setdefault(shard_id, []).append(item_id)
                seen.add(image_id)
        return excluded

    def dropped_item_ids(self) -> set[str]:
        if not self.storage.exists(self.DEDUP_KEY):
            return set()
        return set(self.storage.read_parquet(self.DEDUP_KEY, columns=["item_id"]).column("item_id").to_pylist())

    def write_run_config(self, snapshot: dict) -> None:
        self.storage.write_bytes_atomic(self.RUN_CONFIG_KEY, json.dumps(snapshot, indent=2, default=str).encode())

"""Run layout: where every stage's shards, errors and manifests live under a run root.

```
run.json                          resolved config snapshot, versions, per-stage fingerprints
<stage>/part-<shard>.parquet      output rows of one shard
<stage>/errors/part-<shard>.parquet
<stage>/_manifest/<shard>.json    completion record, written last
<stage>/_index/                   the stage's compacted manifests (pipeline/shard_index.py)
crawl/_input/<shard>.parquet      planned crawl items of one shard
crawl/_plan/inputs.parquet        the input shards' checksums and file versions when last planned (a cache)
crawl/_dedup/dropped.parquet      cross-shard duplicates (error rows, category "filtered")
crawl/_dedup/waves/<prefix>-<k>.parquet  one dedup wave: its rows and decisions (fingerprint chain in metadata)
summary.json                      per-stage counts, errors by reason, wall time, throughput
```
A shard is complete when its manifest exists and the files it names exist with the recorded sizes
(checked on every rerun; ``status --check`` also compares checksums); it is fresh when the
manifest's input checksum and config fingerprint equal the current ones. A shard whose files differ
from its manifest, or whose manifest is unreadable, is recomputed.

Run state at scale (300k-600k shards per stage): :meth:`RunLayout.manifests` reads the stage's index
plus the manifests not folded into it yet, after one listing (:mod:`ps3_engine.pipeline.shard_index`),
and the size check of :meth:`RunLayout.damage` uses one listing of the stage's files instead of a
request per file. The runner folds new manifests into the index when a stage execution ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pyarrow as pa

from ps3_engine.infra.storage import Storage, StorageError, parquet_bytes
from ps3_engine.pipeline import shard_index
from ps3_engine.pipeline.shard_index import Compaction, StageState, count_errors
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

    def to_json(self) -> str:
        """The task as one JSON string (a Ray Data row's ``task`` column)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        """The inverse of :meth:`to_json` (JSON lists back to tuples)."""
        fields = json.loads(text)
        for name in ("input_shards", "exclude_item_ids", "side_input_keys"):
            fields[name] = tuple(fields.get(name, ()))
        return cls(**fields)


class RunLayout:
    """Keys and run state of one run root.

    ``read_only`` layouts (``status``, ``plan``) read each stage's state once and keep it; the others
    read it again on every :meth:`manifests` call, as shards may be committed between two calls.
    """

    def __init__(self, storage: Storage, *, read_only: bool = False) -> None:
        self.storage = storage
        self.read_only = read_only
        # The latest state read per stage: its entries are the ones damage() can check against a listing.
        self._states: dict[str, StageState] = {}

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

    CRAWL_INPUT_PREFIX = "crawl/_input/"
    # Read and written by pipeline/input_record.py, so a re-plan of unchanged lists reads no shard.
    CRAWL_PLAN_RECORD_KEY = "crawl/_plan/inputs.parquet"

    @staticmethod
    def crawl_input_key(shard_id: str) -> str:
        return f"{RunLayout.CRAWL_INPUT_PREFIX}{shard_id}.parquet"

    DEDUP_KEY = "crawl/_dedup/dropped.parquet"
    DEDUP_MANIFEST_KEY = "crawl/_dedup/_manifest.json"

    # -- manifests -----------------------------------------------------------------------------
    def read_manifest(self, stage: str, shard_id: str) -> ManifestEntry | None:
        """The shard's completion record; None when it is absent or damaged (then the shard is not done)."""
        key = self.manifest_key(stage, shard_id)
        try:
            data = self.storage.read_bytes(key)
        except FileNotFoundError:
            return None
        parsed = shard_index.parse_manifest(self.storage, key, data)
        return parsed[0] if parsed is not None else None

    def manifests(self, stage: str) -> dict[str, ManifestEntry]:
        """All readable completion records of ``stage`` by shard id (damaged ones are logged and left out)."""
        return dict(self.stage_state(stage).entries)

    def stage_state(self, stage: str) -> StageState:
        """The stage's committed shards as read now (or, for a read-only layout, when first asked)."""
        if not (self.read_only and stage in self._states):
            self._states[stage] = shard_index.read_stage(self.storage, stage, previous=self._states.get(stage))
        return self._states[stage]

    def compact(self, stage: str) -> Compaction | None:
        """Fold the stage's manifests that its index lacks into it (:func:`shard_index.compact`).

        Called by the runner when a stage execution ends (never by readers: ``status`` and ``plan``
        write nothing). A failure is logged, not raised: the manifests stay the commit, the index is
        only what makes reading them cheap, and the next compaction folds what this one did not.
        """
        if self.read_only:
            raise RuntimeError("a read-only run layout does not compact")
        self._states.pop(stage, None)
        try:
            return shard_index.compact(self.storage, stage)
        except (StorageError, OSError) as exc:
            logger.warning("%s: manifests not folded into the index (%s); the next stage run retries", stage, exc)
            return None

    def error_counts(self, stage: str) -> Counter[tuple[str, str]]:
        """Error rows of ``stage`` by ``(category, reason)``, crawl's dedup drops included.

        Read from the index and the manifests (which record them); only shards committed before
        that was recorded have their errors file read.
        """
        counts: Counter[tuple[str, str]] = Counter()
        for shard_counts in shard_index.shard_error_counts(self.storage, self.stage_state(stage)).values():
            for category, reasons in shard_counts.items():
                counts.update({(category, reason): rows for reason, rows in reasons.items()})
        if stage == "crawl" and self.storage.exists(self.DEDUP_KEY):
            dropped = self.storage.read_parquet(self.DEDUP_KEY, columns=["category", "reason"])
            for category, reasons in count_errors(dropped).items():
                counts.update({(category, reason): rows for reason, rows in reasons.items()})
        return counts

    def stage_files(self, stage: str) -> dict[str, int]:
        """Sizes of the stage's output and error files, listed once per state read (:meth:`stage_state`)."""
        state = self._states.get(stage) or self.stage_state(stage)  # the latest read: its entries are checked
        if state.files is None:
            state.files = shard_index.list_stage_files(self.storage, stage)
        return state.files

    def prefetch(self, stages: list[str]) -> None:
        """Read the state and file listing of several stages at once (their listings overlap in time)."""
        shard_index.parallel_map(self.stage_files, stages, threads=len(stages) or 1)

    def _listed_sizes(self, entry: ManifestEntry) -> dict[str, int] | None:
        """Sizes of the stage's files from one listing, if ``entry`` is from the latest state read."""
        state = self._states.get(entry.stage)
        if state is None or state.entries.get(entry.shard_id) is not entry:
            return None
        return self.stage_files(entry.stage)

    def damage(self, entry: ManifestEntry) -> tuple[ShardState, str] | None:
        """``("missing" | "damaged", why)`` when a committed shard's files do not match its manifest, else None.

        The cheap check of every rerun and ``status``: each file exists with the size the manifest
        recorded. For an entry of the latest :meth:`manifests` read, the sizes come from one listing of
        the stage's files (read once); otherwise one metadata request per file. Full checksums are
        ``status --check``'s job (:mod:`ps3_engine.pipeline.verify`).
        """
        listed = self._listed_sizes(entry)
        for key, recorded in ((entry.output_key, entry.output_bytes), (entry.errors_key, entry.errors_bytes)):
            if listed is not None:
                size = listed.get(key)
            else:
                found = self.storage.info(key)
                size = found.size if found is not None else None
            if size is None:
                return "missing", f"{self.storage.uri(key)} is missing"
            if recorded is not None and size != recorded:
                return "damaged", f"{self.storage.uri(key)} is {size} bytes but its manifest recorded {recorded}"
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
        # The error counts ride beside the entry's fields (ManifestEntry ignores them on reading): status
        # and summaries count errors by reason from the index instead of reading every errors file.
        record = {**entry.model_dump(mode="json"), "error_counts": count_errors(errors)}
        self.storage.write_bytes_atomic(
            self.manifest_key(task.stage, task.shard_id), json.dumps(record, indent=2).encode()
        )
        return entry

    # -- reading results -----------------------------------------------------------------------
    def read_output(self, stage: str, shard_id: str, columns: list[str] | None = None) -> pa.Table:
        return self.storage.read_parquet(self.output_key(stage, shard_id), columns=columns)

    def read_shard_errors(self, stage: str, shard_id: str) -> pa.Table:
        return self.storage.read_parquet(self.errors_key(stage, shard_id))

    def read_errors(self, stage: str) -> pa.Table:
        """The stage's whole errors table: per-shard error files plus, for crawl, dedup drops."""

        def read(shard: str) -> pa.Table | None:
            try:
                return self.read_shard_errors(stage, shard)
            except (StorageError, FileNotFoundError) as exc:  # damaged: the next rerun recomputes the shard
                logger.warning("%s shard %s: errors not counted: %s", stage, shard, exc)
                return None

        tables = [t for t in shard_index.parallel_map(read, sorted(self.manifests(stage))) if t is not None]
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

"""The record of planned input shards, so that re-planning an unchanged input reads and writes no shard.

```
crawl/_plan/inputs.parquet    one row per input shard the last plan wrote or checked: its shard id, the
                              input checksum of its items and the version (size, write time) of its file
```
A re-plan lists ``crawl/_input/`` once and reads this record. A planned shard whose checksum equals the
recorded one, and whose file's listed version is the recorded version, is unchanged: nothing is read,
built or written for it. Any other shard (new, re-planned to other items, its file rewritten or gone,
not recorded) is checked as before, against the checksum in its Parquet metadata, and written when it
differs. The record is a cache, never the truth: a missing, unreadable or outdated record only costs those
per-shard checks (two requests each), which is what re-planning 78k shards cost before (issue 15).

The record is written after the shard writes, from a listing made after them. S3 write times are whole
seconds on most servers, so a file rewritten in the second it was listed would keep its version: as in
:mod:`ps3_engine.pipeline.shard_index`, only files written before the newest file listed are recorded (a
rewrite comes after that listing, so in a later second); the others are checked again next time. Two
plans writing the same run root at once are not supported (their shards would race too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from ps3_engine.infra.storage import ObjectInfo, Storage, StorageError

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORD_SCHEMA = pa.schema(
    [
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("input_checksum", pa.string(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
    ],
    metadata={"record_kind": "planned_inputs", "schema_version": str(RECORD_VERSION)},
)

Recorded = dict[str, tuple[str, str]]  # shard id -> (input checksum, file version)


def shard_id_of(key: str) -> str:
    """``crawl/_input/<shard>.parquet`` -> ``<shard>``."""
    return key.rsplit("/", 1)[-1].removesuffix(".parquet")


def list_inputs(storage: Storage, prefix: str) -> dict[str, ObjectInfo]:
    """The input shard files under ``prefix`` by shard id, with their versions (one listing)."""
    listed = storage.list_versions(prefix, recursive=False)
    return {shard_id_of(obj.key): obj for obj in listed if obj.key.endswith(".parquet")}


def read_record(storage: Storage, key: str) -> Recorded:
    """The record at ``key``; empty when there is none or it is unreadable (then every shard is checked)."""
    if not storage.exists(key):
        return {}
    try:
        table = storage.read_parquet(key)
    except StorageError as exc:
        logger.warning("ignoring unreadable plan record %s (every input shard is checked): %s", key, exc)
        return {}
    if table.schema.metadata != RECORD_SCHEMA.metadata or table.column_names != RECORD_SCHEMA.names:
        logger.warning("ignoring plan record %s of another format (every input shard is checked)", key)
        return {}
    columns = [table.column(name).to_pylist() for name in RECORD_SCHEMA.names]
    return {shard: (checksum, version) for shard, checksum, version in zip(*columns, strict=True)}


def recordable(listed: dict[str, ObjectInfo], checksums: dict[str, str]) -> Recorded:
    """The rows to record: planned shards listed with a write time before the newest listed file's."""
    times = [obj.modified for obj in listed.values() if obj.modified is not None]
    if not times:
        return {}
    newest = max(times)
    return {
        shard: (checksum, obj.version)
        for shard, checksum in checksums.items()
        if (obj := listed.get(shard)) is not None and obj.modified is not None and obj.modified < newest
    }


def write_record(storage: Storage, key: str, recorded: Recorded) -> None:
    shards = sorted(recorded)
    table = pa.table([shards, [recorded[s][0] for s in shards], [recorded[s][1] for s in shards]], schema=RECORD_SCHEMA)
    storage.write_parquet_atomic(key, table)


@dataclass
class InputRecord:
    """What a plan knows of the stored input shards before it writes any: the listing and the record."""

    storage: Storage
    prefix: str  # the input shards' folder, e.g. ``crawl/_input/``
    key: str  # the record, e.g. ``crawl/_plan/inputs.parquet``
    listed: dict[str, ObjectInfo] = field(default_factory=dict)
    recorded: Recorded = field(default_factory=dict)

    @classmethod
    def load(cls, storage: Storage, prefix: str, key: str) -> InputRecord:
        return cls(storage, prefix, key, list_inputs(storage, prefix), read_record(storage, key))

    def unchanged(self, shard_id: str, checksum: str) -> bool:
        """Whether the stored shard holds these items, by the record alone (no request)."""
        obj = self.listed.get(shard_id)
        return obj is not None and self.recorded.get(shard_id) == (checksum, obj.version)

    def stored(self, shard_id: str) -> bool:
        """Whether the shard's file was listed before the plan wrote anything."""
        return shard_id in self.listed

    def update(self, checksums: dict[str, str]) -> bool:
        """Record the planned shards (``checksums``: shard id -> input checksum) after their writes.

        Lists the shards again and rewrites the record only when its rows change, so a re-plan of an
        unchanged input writes nothing. Returns whether the record was written.
        """
        listed = list_inputs(self.storage, self.prefix)
        # Shards of other plans on this root (other lists) stay recorded while their files are unchanged.
        recorded = {
            shard: row
            for shard, row in self.recorded.items()
            if shard not in checksums and (obj := listed.get(shard)) is not None and obj.version == row[1]
        }
        recorded.update(recordable(listed, checksums))
        if recorded == self.recorded:
            return False
        write_record(self.storage, self.key, recorded)
        self.recorded = recorded
        return True

"""Run state that scales: the per-stage shard index (pipeline/shard_index.py) on local disk and on S3.

Real storage throughout (a temp folder, the SeaweedFS bucket of the ``s3_bucket`` fixture); requests are
counted by wrapping the Storage instance's methods, not by replacing them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline import shard_index
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.shard_index import INDEX_SCHEMA, MAX_PARTS, index_manifest_key
from ps3_engine.schemas import ERROR_SCHEMA

STAGE = "crawl"


def errors_table(shard: str, count: int) -> pa.Table:
    now = datetime.now(UTC)
    rows = [
        {
            "item_id": f"{shard}-{i}",
            "stage": STAGE,
            "shard_id": shard,
            "input_ref": f"https://example.com/{i}.jpg",
            "category": "failed" if i % 2 else "filtered",
            "reason": f"reason-{i % 3}",
            "transient": False,
            "message": "synthetic",
            "attempts": 1,
            "created_at": now,
        }
        for i in range(count)
    ]
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def commit(layout: RunLayout, shard: str, rows: int, attempt: int = 1) -> None:
    task = ShardTask(STAGE, shard, f"crawl/_input/{shard}.parquet", f"input-{shard}", (shard,))
    layout.commit_shard(
        task,
        fingerprint="fp",
        output=pa.table({"item_id": [f"{shard}-{i}" for i in range(rows)]}),
        errors=errors_table(shard, rows % 4),
        attempt=attempt,
        wall_seconds=0.5,
    )


def settle(layout: RunLayout) -> None:
    """Commit a marker shard in a later write second than every commit before it.

    Compaction folds only manifests written before the newest one it lists (S3 write times are whole
    seconds), so this makes every earlier commit foldable on S3 as on local disk.
    """
    time.sleep(1.1 if layout.storage.is_s3 else 0.0)
    commit(layout, "zz-latest", rows=1)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    return Storage(f"s3://{request.getfixturevalue('s3_bucket')}/run")


def test_manifests_are_the_same_before_and_after_compaction(storage):
    layout = RunLayout(storage)
    for i in range(12):
        commit(layout, f"s{i:03d}", rows=i)
    settle(layout)
    before = layout.manifests(STAGE)
    assert len(before) == 13
    assert layout.compact(STAGE).folded == 12  # all but the newest manifest
    state = RunLayout(storage).stage_state(STAGE)
    assert (state.folded, state.unfolded, len(state.parts)) == (12, ["zz-latest"], 1)
    assert RunLayout(storage).manifests(STAGE) == before

    # New shards and a recommitted one after the compaction: their JSONs are read, and the newer JSON wins.
    commit(layout, "s003", rows=40, attempt=2)
    commit(layout, "s100", rows=7)
    settle(layout)
    after = layout.manifests(STAGE)
    assert after["s003"].output_rows == 40 and after["s003"].attempt == 2 and "s100" in after
    state = RunLayout(storage).stage_state(STAGE)
    assert sorted(state.unfolded) == ["s003", "s100", "zz-latest"] and state.folded == 11
    assert RunLayout(storage).manifests(STAGE) == after
    assert layout.compact(STAGE).folded == 2
    assert RunLayout(storage).manifests(STAGE) == after
    assert RunLayout(storage).stage_state(STAGE).unfolded == ["zz-latest"]
    # Error counts from the index equal those of the errors files themselves.
    errors = layout.read_errors(STAGE)
    expected = Counter(zip(errors.column("category").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    assert RunLayout(storage).error_counts(STAGE) == expected


def test_parts_are_merged_past_the_limit_and_nothing_is_lost(tmp_path):
    storage = Storage(str(tmp_path))
    layout = RunLayout(storage)
    for i in range(MAX_PARTS + 3):  # each compaction folds the shard before the newest
        commit(layout, f"s{i:03d}", rows=i + 1)
        layout.compact(STAGE)
    meta = storage.read_json(index_manifest_key(STAGE))
    assert len(meta["parts"]) < MAX_PARTS  # merged once on the way
    assert {o.key for o in storage.list(f"{STAGE}/_index/") if o.key.endswith(".parquet")} == {
        part["key"] for part in meta["parts"]
    }
    state = RunLayout(storage).stage_state(STAGE)
    assert (state.folded, state.unfolded) == (MAX_PARTS + 2, [f"s{MAX_PARTS + 2:03d}"])
    assert {s: e.output_rows for s, e in layout.manifests(STAGE).items()} == {
        f"s{i:03d}": i + 1 for i in range(MAX_PARTS + 3)
    }


def test_an_index_part_without_its_commit_or_with_other_bytes_is_not_trusted(storage):
    layout = RunLayout(storage)
    for i in range(4):
        commit(layout, f"s{i:03d}", rows=i + 1)
    settle(layout)
    assert layout.compact(STAGE).folded == 4
    truth = RunLayout(storage).manifests(STAGE)

    # A compaction that died after writing its part and before naming it: the part claims other contents.
    forged = [
        {
            **truth["s001"].model_dump(),
            "output_rows": 999,
            "manifest_version": storage.list_versions(f"{STAGE}/_manifest/")[1].version,
            "error_counts": "{}",
        }
    ]
    storage.write_parquet_atomic(
        f"{STAGE}/_index/part-000002-deadbeef.parquet", pa.Table.from_pylist(forged, INDEX_SCHEMA)
    )
    assert RunLayout(storage).manifests(STAGE) == truth

    # The named part's bytes replaced (a torn copy): the sha256 differs, so every shard is read from its JSON.
    meta = storage.read_json(index_manifest_key(STAGE))
    storage.write_parquet_atomic(meta["parts"][0]["key"], pa.Table.from_pylist(forged, INDEX_SCHEMA))
    state = RunLayout(storage).stage_state(STAGE)
    assert state.parts == [] and sorted(state.unfolded) == sorted(truth)
    assert RunLayout(storage).manifests(STAGE) == truth

    # A shard counts only while its manifest JSON exists, whatever the index says.
    layout.compact(STAGE)
    storage.delete(layout.manifest_key(STAGE, "s002"))
    assert sorted(RunLayout(storage).manifests(STAGE)) == ["s000", "s001", "s003", "zz-latest"]


def test_a_damaged_manifest_is_left_out_and_never_folded(tmp_path, caplog):
    storage = Storage(str(tmp_path))
    layout = RunLayout(storage)
    commit(layout, "s000", rows=3)
    commit(layout, "s001", rows=3)
    key = layout.manifest_key(STAGE, "s001")
    storage.write_bytes_atomic(key, storage.read_bytes(key)[:40])
    assert layout.compact(STAGE).folded == 1
    assert sorted(layout.manifests(STAGE)) == ["s000"]
    assert "is damaged" in caplog.text


class CountingStorage:
    """Counts the requests a Storage instance makes, by method (wraps the real methods)."""

    METHODS = ("read_bytes", "read_json", "read_parquet", "info", "exists", "list", "list_versions")

    def __init__(self, storage: Storage) -> None:
        self.calls: Counter[str] = Counter()
        for name in self.METHODS:
            setattr(storage, name, self._counted(name, getattr(storage, name)))

    def _counted(self, name, method):
        def call(*args, **kwargs):
            self.calls[name] += 1
            return method(*args, **kwargs)

        return call


def test_a_rerun_skip_reads_the_index_and_lists_once(storage):
    layout = RunLayout(storage)
    num_shards = 40
    for i in range(num_shards):
        commit(layout, f"s{i:03d}", rows=i % 7)
    settle(layout)
    assert layout.compact(STAGE).folded == num_shards
    commit(layout, "s040", rows=2)  # committed after the compaction: one JSON read

    reader = RunLayout(Storage(storage.root_uri, storage.s3))
    counter = CountingStorage(reader.storage)
    tasks = [ShardTask(STAGE, f"s{i:03d}", f"crawl/_input/s{i:03d}.parquet", f"input-s{i:03d}", ()) for i in range(41)]
    entries = reader.manifests(STAGE)
    states = Counter(reader.shard_state(task, "fp", entries.get(task.shard_id)) for task in tasks)
    assert states == {"done": 41}
    # Objects read (read_json reads through read_bytes): the index manifest, its one part and the two JSONs
    # not folded (zz-latest, s040); listings: _manifest/ once and the stage's two file folders; no request
    # per shard.
    assert counter.calls == {"read_json": 1, "read_bytes": 4, "list_versions": 3}

    # The same listing still finds damage: a file whose size differs from its manifest.
    reader.storage.write_bytes_atomic(RunLayout.output_key(STAGE, "s005"), b"not the shard")
    reader.storage.delete(RunLayout.errors_key(STAGE, "s006"))
    entries = reader.manifests(STAGE)
    states = {task.shard_id: reader.shard_state(task, "fp", entries.get(task.shard_id)) for task in tasks}
    assert (states["s005"], states["s006"], Counter(states.values())["done"]) == ("damaged", "missing", 39)


def test_manifest_json_keeps_the_error_counts_beside_the_entry(tmp_path):
    storage = Storage(str(tmp_path))
    layout = RunLayout(storage)
    commit(layout, "s000", rows=3)  # 3 error rows: reasons 0, 1, 2
    record = json.loads(storage.read_bytes(layout.manifest_key(STAGE, "s000")))
    assert record["error_counts"] == {"filtered": {"reason-0": 1, "reason-2": 1}, "failed": {"reason-1": 1}}
    assert layout.read_manifest(STAGE, "s000") == layout.manifests(STAGE)["s000"]
    # A manifest without them (written before they were recorded): its errors file is counted instead.
    record.pop("error_counts")
    storage.write_bytes_atomic(layout.manifest_key(STAGE, "s000"), json.dumps(record).encode())
    assert shard_index.read_stage(storage, STAGE).error_counts["s000"] is None
    assert sum(RunLayout(storage).error_counts(STAGE).values()) == 3


def test_a_polling_driver_reads_only_the_manifests_committed_since_its_last_read(storage):
    layout = RunLayout(storage)  # not compacted: a stage still running
    for i in range(6):
        commit(layout, f"s{i:03d}", rows=i)
    settle(layout)
    assert len(layout.manifests(STAGE)) == 7
    commit(layout, "s006", rows=3)
    settle(layout)  # rewrites zz-latest
    counter = CountingStorage(layout.storage)
    entries = layout.manifests(STAGE)
    assert len(entries) == 8 and entries["s006"].output_rows == 3
    # The absent index manifest, the new shard and the rewritten one; the six others are known already.
    assert counter.calls == {"list_versions": 1, "read_json": 1, "read_bytes": 3}
    assert entries == RunLayout(storage).manifests(STAGE)

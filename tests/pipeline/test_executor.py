"""Executors: Ray Data actor pools and the in-process executor run the same worker code to the same result."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.executor import ExecutorConfig, InProcessExecutor, RayDataExecutor
from ps3_engine.pipeline.layout import RunLayout, ShardTask
from ps3_engine.pipeline.shard_runner import StageSpec
from ps3_engine.schemas import CRAWL_ITEM_SCHEMA
from tests.support.stages import EchoConfig, EchoModelStage


def write_tasks(storage: Storage, refs_per_shard: list[list[str]]) -> list[ShardTask]:
    tasks = []
    for index, refs in enumerate(refs_per_shard):
        shard_id = f"s-{index:03d}"
        rows = [
            {
                "item_id": f"{shard_id}-{i}",
                "source_ref": ref,
                "source_kind": "file",
                "source_list": "l",
                "license": None,
                "attribution": None,
                "metadata_json": "{}",
            }
            for i, ref in enumerate(refs)
        ]
        key = f"echo/_input/{shard_id}.parquet"
        storage.write_parquet_atomic(key, pa.Table.from_pylist(rows, schema=CRAWL_ITEM_SCHEMA))
        tasks.append(ShardTask("echo", shard_id, key, f"checksum-{index}", ("l",)))
    return tasks


SHARDS = [[f"ref-{s}-{i}" for i in range(5)] for s in range(6)]
SHARDS[2][1] = "ref-bad-2-1"


def run(executor, root) -> tuple[RunLayout, list]:
    storage = Storage(str(root))
    tasks = write_tasks(storage, SHARDS)
    spec = StageSpec(EchoModelStage, EchoConfig())
    reports = list(executor.run(spec, storage, "fp", tasks))
    return RunLayout(storage), reports


def outputs(layout: RunLayout) -> list[tuple]:
    rows = [r for shard in sorted(layout.manifests("echo")) for r in layout.read_output("echo", shard).to_pylist()]
    return [(r["item_id"], r["shard_id"], r["upper_ref"]) for r in rows]


def test_ray_actor_pool_matches_in_process(ray_local, tmp_path):
    ray_layout, ray_reports = run(RayDataExecutor(ExecutorConfig(progress=False)), tmp_path / "ray")
    local_layout, local_reports = run(InProcessExecutor(ExecutorConfig(kind="local", progress=False)), tmp_path / "lo")
    assert outputs(ray_layout) == outputs(local_layout)
    assert len(outputs(ray_layout)) == 29
    assert sorted(r.shard_id for r in ray_reports) == [f"s-{i:03d}" for i in range(6)]
    assert all(r.status == "computed" for r in ray_reports + local_reports)
    errors = ray_layout.read_errors("echo").to_pylist()
    assert [(e["item_id"], e["reason"]) for e in errors] == [("s-002-1", "bad_item")]
    # Model stages run in an actor pool: setup once per actor, at most max_workers actors.
    rows = [r for s in ray_layout.manifests("echo") for r in ray_layout.read_output("echo", s).to_pylist()]
    pids = {r["worker_pid"] for r in rows}
    assert 1 <= len(pids) <= 2
    assert {r["setup_calls"] for r in rows} == {1}


@pytest.mark.parametrize("kind", ["ray", "local"])
def test_a_crashing_shard_fails_alone_and_commits_nothing(kind, ray_local, tmp_path):
    storage = Storage(str(tmp_path))
    shards = [["a", "b"], ["c", "crash-me"], ["d"]]
    tasks = write_tasks(storage, shards)
    executor = (RayDataExecutor if kind == "ray" else InProcessExecutor)(ExecutorConfig(kind=kind, progress=False))
    reports = {r.shard_id: r for r in executor.run(StageSpec(EchoModelStage, EchoConfig()), storage, "fp", tasks)}
    assert reports["s-001"].status == "failed" and "model blew up" in reports["s-001"].message
    assert reports["s-000"].status == reports["s-002"].status == "computed"
    layout = RunLayout(storage)
    assert sorted(layout.manifests("echo")) == ["s-000", "s-002"]
    assert not storage.exists(layout.output_key("echo", "s-001"))

"""``status`` tells done, running, interrupted and partial stages apart, also during a forced recompute."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.executor import ExecutorConfig, InProcessExecutor
from ps3_engine.pipeline.run_state import RunningMarker, read_running, running_key
from ps3_engine.pipeline.shard_runner import StageSpec
from ps3_engine.pipeline.status import run_status
from tests.pipeline.test_executor import SHARDS, write_tasks
from tests.support.stages import EchoConfig, EchoModelStage
from tests.support.zoo import ZOO_CRAWL_OVERRIDES


def test_status_during_a_recompute_and_after_an_interrupted_one(zoo, tmp_path, capsys):
    urls = tmp_path / "urls.txt"
    urls.write_text("\n".join(zoo.url(p) for p in ("/good/0.jpg", "/good/1.jpg", "/small.jpg")))
    run_root = str(tmp_path / "run")
    sets = [a for o in [*ZOO_CRAWL_OVERRIDES, "executor.progress=false"] for a in ("--set", o)]
    assert main(["crawl", "--run-root", run_root, "--input", str(urls), "--executor", "local", *sets]) == 0
    assert run_status(run_root)["stages"]["crawl"].state == "done"
    storage = Storage(run_root)
    shard_ids = [o.key.rsplit("/", 1)[-1].removesuffix(".json") for o in storage.list("crawl/_manifest/")]

    # What the executor writes when a forced recompute starts: the old manifests are still fresh, but
    # their shards are not done until committed again.
    with RunningMarker(storage, "crawl", shard_ids) as marker:
        crawl = run_status(run_root)["stages"]["crawl"]
        assert (crawl.state, crawl.done, crawl.running) == ("running", 0, len(shard_ids))
        capsys.readouterr()
        assert main(["status", run_root]) == 0
        assert "crawl         running" in capsys.readouterr().out
        # The driver died: its heartbeat stops, and status says so.
        old = datetime.now(UTC) - timedelta(hours=1)
        marker.record.updated_at = old.isoformat()
        storage.write_json_atomic(running_key("crawl"), asdict(marker.record))
        crawl = run_status(run_root)["stages"]["crawl"]
        assert (crawl.state, crawl.running) == ("interrupted", len(shard_ids))
    assert run_status(run_root)["stages"]["crawl"].state == "done"
    assert not read_running(storage)
    assert main(["status", run_root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["crawl"]["state"] == "done"


def test_the_executor_keeps_a_record_while_its_shards_run(tmp_path):
    storage = Storage(str(tmp_path))
    tasks = write_tasks(storage, SHARDS)
    executor = InProcessExecutor(ExecutorConfig(kind="local", progress=False))
    reports = executor.run(StageSpec(EchoModelStage, EchoConfig()), storage, "fp", tasks)
    next(reports)  # one shard done, five to go
    record = read_running(storage)["echo"]
    assert record.shard_ids == sorted(t.shard_id for t in tasks) and record.is_alive()
    assert len(list(reports)) == 5
    assert not read_running(storage)

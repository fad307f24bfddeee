"""``status`` tells done, running, interrupted and partial stages apart, also during a forced recompute."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pyarrow as pa

from benchmarks.synthetic_run import SyntheticRun
from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline import verify
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.executor import ExecutorConfig, InProcessExecutor
from ps3_engine.pipeline.layout import RunLayout
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


def test_status_reads_few_objects_and_still_finds_a_replanned_input(tmp_path, monkeypatch):
    """A finished run read through its index: no request per shard, except for inputs newer than their commit."""
    root = str(tmp_path / "run")
    storage = Storage(root)
    run = SyntheticRun(storage, 4_000, straggler_pause_s=0.0)
    run.write()
    shards = len(run.shard_items)
    status = run_status(root)
    assert {name: (s.state, s.done) for name, s in status["stages"].items()} == dict.fromkeys(
        ("crawl", "segment", "caption", "build-corpus"), ("done", shards)
    )
    assert status["stages"]["crawl"].errors_by_reason["duplicate"] == len(layout_drops(storage))

    # Re-plan one crawl input with other items: its checksum changes and the input is newer than its commit.
    shard = sorted(run.shard_items)[3]
    key = RunLayout.crawl_input_key(shard)
    table = pa.table({"item_id": ["other"]}).replace_schema_metadata({"input_checksum": "replanned"})
    storage.write_parquet_atomic(key, table)
    reads: list[str] = []
    original = Storage.read_bytes

    def read_bytes(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    crawl = run_status(root)["stages"]["crawl"]
    assert (crawl.state, crawl.done, crawl.stale) == ("partial", shards - 1, 1)
    # Of the crawl inputs only the re-planned one is read; in all: run.json, and per stage its index
    # manifest, its one part and its newest manifest (never folded: see shard_index), whatever the shards.
    assert [k for k in reads if k.startswith("crawl/_input/")] == [key]
    assert len(reads) == 1 + 4 * 3 + 1, reads


def layout_drops(storage: Storage) -> list[str]:
    return RunLayout(storage).storage.read_parquet(RunLayout.DEDUP_KEY, columns=["item_id"]).column(0).to_pylist()


def test_verify_on_ray_finds_what_the_in_process_check_finds(tmp_path, ray_local, monkeypatch):
    storage = Storage(str(tmp_path / "run"))
    run = SyntheticRun(storage, 3_000, straggler_pause_s=0.0)
    run.write()
    layout = RunLayout(storage)
    first, second = sorted(run.shard_items)[:2]
    storage.write_bytes_atomic(RunLayout.output_key("segment", first), b"not parquet")
    storage.delete(RunLayout.errors_key("caption", second))
    monkeypatch.setattr(verify, "BATCH_KEYS", 8)  # several batches, so several Ray tasks
    in_process = verify.verify_run(layout, use_ray=False)
    assert [gap.examples[0] for gap in in_process] == [
        f"{storage.uri(RunLayout.errors_key('caption', second))} is missing",
        f"{storage.uri(RunLayout.output_key('segment', first))} is 11 bytes but its manifest recorded "
        f"{run.layout.manifests('segment')[first].output_bytes}",
    ]
    assert verify.verify_run(layout, use_ray=True) == in_process


def test_a_failed_corpus_shard_is_summarised_under_build_corpus_and_cleared_by_its_rerun(tmp_path):
    """build-corpus's shards are "corpus" shards: their failures were filed under "corpus", which status
    (looking up "build-corpus") never counted and a later successful build-corpus never cleared."""
    from ps3_engine.pipeline.runner import StageRunResult, write_summary
    from ps3_engine.pipeline.shard_runner import ShardReport

    layout = RunLayout(Storage(str(tmp_path)))

    def result(failed: list[str]) -> StageRunResult:
        return StageRunResult("build-corpus", 2, 0, 2, failed, 0, 0, 0, 1.0, 0.5)

    failed = write_summary(layout, [result(["s1"])], [ShardReport("corpus", "s1", "failed", message="disk full")])
    assert failed["failed_shards"] == [{"stage": "build-corpus", "shard_id": "s1", "message": "disk full"}]
    crawl = StageRunResult("crawl", 1, 0, 1, [], 0, 0, 0, 1.0, 0.5)
    kept = write_summary(layout, [crawl], [ShardReport("crawl", "c1", "computed")])
    assert [f["stage"] for f in kept["failed_shards"]] == ["build-corpus"]  # another stage's run keeps it
    assert write_summary(layout, [result([])], [ShardReport("corpus", "s1", "computed")])["failed_shards"] == []


def test_status_and_report_list_render_shards_without_a_summary_entry(rerun_run, tmp_path, capsys):
    """Before, status listed render only when summary.json had a render entry (or one was in progress),
    so the render shards of a run whose summary lacked it went unlisted, and so did their corpus
    shards under build-corpus; the report's stage table left such a stage out too."""
    from ps3_engine.pipeline.report import build_report

    root = rerun_run.copy_run(tmp_path / "run")
    summary = json.loads((root / "summary.json").read_text())
    del summary["stages"]["render"]
    (root / "summary.json").write_text(json.dumps(summary))
    stages = run_status(str(root))["stages"]
    assert list(stages) == ["crawl", "segment", "caption", "render", "build-corpus"]
    assert (stages["render"].state, stages["render"].done) == ("done", 1)
    assert stages["build-corpus"].done == 3  # the images' two corpus shards and the pages' one
    capsys.readouterr()
    assert main(["status", str(root)]) == 0
    assert "  render        done" in capsys.readouterr().out
    assert "<td>render</td><td>1 committed (not in summary.json)</td>" in build_report(str(root), samples=0)

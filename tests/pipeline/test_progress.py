"""Item progress: workers report every batch (not every shard), in-process and through the Ray progress actor."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.executor import ExecutorConfig, InProcessExecutor, RayDataExecutor
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.progress import ItemCounts, ItemProgress, RayProgressPoller
from ps3_engine.pipeline.shard_runner import StageSpec, run_shard
from tests.pipeline.test_executor import SHARDS, write_tasks
from tests.support.stages import EchoConfig, EchoModelStage


def test_a_shard_reports_each_batch_as_it_finishes(tmp_path):
    storage = Storage(str(tmp_path))
    (task,) = write_tasks(storage, [SHARDS[2]])  # 5 items, one of them a bad item; batches of 3
    calls = []
    stage = EchoModelStage(EchoConfig(batch_size=3))
    report = run_shard(stage, RunLayout(storage), task, "fp", on_batch=lambda *c: calls.append(c))
    assert report.status == "computed"
    assert calls == [("input", 5, 0, 0), ("process", 3, 2, 1), ("process", 2, 2, 0)]


def test_counts_and_estimated_total():
    counts = ItemCounts()
    assert counts.estimated_total(4) is None
    counts.add("input", 10, 0, 0)
    assert counts.estimated_total(4) == 40  # one shard of 10 loaded: 3 more like it expected
    counts.add("prepare", 10, 8, 2)  # 2 items rejected in the CPU phase are done; 8 go on
    counts.add("process", 8, 30, 1)  # 8 images -> 30 captions and 1 caption error
    counts.add("input", 20, 0, 0)
    assert (counts.items, counts.outputs, counts.errors) == (10, 30, 3)
    assert counts.estimated_total(4) == 60


def test_in_process_bar_ends_with_item_totals(tmp_path, capsys):
    storage = Storage(str(tmp_path))
    tasks = write_tasks(storage, SHARDS)
    executor = InProcessExecutor(ExecutorConfig(kind="local", progress=True))
    reports = list(executor.run(StageSpec(EchoModelStage, EchoConfig()), storage, "fp", tasks))
    assert len(reports) == 6
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # 30 items in 6 shards; 29 outputs and 1 error row; the bar counts items, not shards.
    assert "30/30" in final and "rows=29" in final and "errors=1" in final, final
    assert not storage.list("_running/")  # the in-progress record is gone once the stage ends


def test_without_a_terminal_progress_is_plain_lines(capsys):
    """A log file (CI, a cluster job) got tqdm's carriage returns and, with a pipelined run's bars open at
    once, cursor-up escapes; without a terminal each stage now writes plain lines instead."""
    crawl = ItemProgress("crawl", 2, True, position=0, interactive=False)
    segment = ItemProgress("segment", 2, True, position=1, interactive=False)
    for bar in (crawl, segment):
        bar.on_batch("input", 5, 0, 0)
        bar.on_batch("process", 5, 4, 1)
    crawl.note("crawl: shard aaaa-00001 failed: disk full")
    crawl.mark_failed(1)
    for bar in (crawl, segment):
        bar.close()
    silent = ItemProgress("caption", 2, False, interactive=False)
    silent.on_batch("process", 5, 4, 1)
    silent.close()
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err, repr(err)
    lines = err.splitlines()
    # One line at the first batch of each stage (then at most one per interval), the note, a last line each.
    assert lines[0].startswith("crawl: 5/10 items (50%)") and "images=4, errors=1" in lines[0], lines
    assert lines[1].startswith("segment: 5/10 images (50%)") and "regions=4, errors=1" in lines[1], lines
    assert lines[2] == "crawl: shard aaaa-00001 failed: disk full"
    assert lines[3].startswith("crawl: 5/10 items") and lines[3].endswith("errors=1, failed shards=1]"), lines
    assert lines[4].startswith("segment: 5/10 images") and len(lines) == 5, lines


def test_ray_workers_report_through_the_progress_actor(ray_local):
    progress = ItemProgress("caption", num_shards=2, enabled=False)

    @ray_local.remote(num_cpus=0)
    def worker(callback, rows):
        callback("input", rows, 0, 0)
        callback("process", rows, 3 * rows, 1)

    with RayProgressPoller(progress) as poller:
        ray_local.get([worker.remote(poller.callback, 4), worker.remote(poller.callback, 6)])
        deadline = time.monotonic() + 30
        while progress.counts.items < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert (progress.counts.items, progress.counts.outputs, progress.counts.errors) == (10, 30, 2)
    assert progress.total == 10


def test_a_healthy_ray_actor_pool_run_prints_no_error_line(ray_local, tmp_path, capfd):
    """Model actors are created with max_restarts=0: Ray logs an error-level line for restartable actors
    whose constructor arguments are in the object store, as Ray Data's always are."""
    storage = Storage(str(tmp_path))
    tasks = write_tasks(storage, SHARDS)
    executor = RayDataExecutor(ExecutorConfig(progress=False))
    reports = list(executor.run(StageSpec(EchoModelStage, EchoConfig()), storage, "fp", tasks))
    assert sorted(r.status for r in reports) == ["computed"] * 6
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "max_restarts" not in output and " E " not in output and "ERROR" not in output, output[-2000:]


class DiesOnceStage(EchoModelStage):
    """Echo, but the worker process exits on a ref ``die:FLAG`` the first time (FLAG does not exist yet)."""

    def process_batch(self, batch, context):
        for ref in batch.column("source_ref").to_pylist():
            if ref.startswith("die:") and not Path(ref[4:]).exists():
                Path(ref[4:]).touch()
                os._exit(1)  # a lost actor (OOM kill, node loss), not an exception
        return super().process_batch(batch, context)


def test_shards_of_a_lost_actor_run_again_on_fresh_actors(ray_local, tmp_path):
    storage = Storage(str(tmp_path / "run"))
    shards = [list(refs) for refs in SHARDS]
    shards[3][0] = f"die:{tmp_path / 'died-once'}"
    tasks = write_tasks(storage, shards)
    executor = RayDataExecutor(ExecutorConfig(progress=False))
    reports = list(executor.run(StageSpec(DiesOnceStage, EchoConfig()), storage, "fp", tasks))
    assert (tmp_path / "died-once").exists()  # the actor really died
    assert sorted(r.shard_id for r in reports) == [t.shard_id for t in tasks]  # each shard reported once
    assert all(r.status == "computed" for r in reports)
    assert len(RunLayout(storage).manifests("echo")) == 6

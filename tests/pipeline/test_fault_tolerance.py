"""Fault tolerance: killed Ray workers, a killed driver, an S3 outage and a full disk all end in a run that a
plain rerun completes with exactly the rows of a clean run, and nothing partial ever counts as complete.

Every test runs the small captioned pipeline (4 generated scenes, one image per shard, the tiny captioner)
under one fault, checks what the fault left behind (every manifest's files exist with the recorded checksum),
reruns plainly and compares the packed dataset row by row with one clean run of the same input and config.
The faults are real where they can be: SIGKILL of Ray worker processes and of a ``ps3-engine`` driver, a
loopback proxy in front of SeaweedFS that resets connections or answers 503 SlowDown, a tiny tmpfs.

Run: ``RAY_AUTH_MODE=disabled .venv/bin/python -m pytest -q tests/pipeline/test_fault_tolerance.py``
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.conservation import check_run
from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import StageRunResult, run_pipeline
from ps3_engine.pipeline.samples import write_scenes
from tests.support.faults import FaultProxy, MountUnavailable, ProcessKiller, tmpfs

pytestmark = pytest.mark.slow

NUM_SCENES = 4
SHARD_STAGES = ("crawl", "segment", "caption", "corpus")
DATASET_SHARD = re.compile(r"^dataset/images/(train|validation)/shard-[0-9a-f]+-\d+\.parquet$")
ROW_COLUMNS = ["image_id", "split", "regions", "global_caption"]
CAPTION_ACTOR_AT_WORK = "ray::MapWorker(MapBatches(ShardWorker)).submit"  # idle: no ".submit"
SEGMENT_TASK_AT_WORK = "ray::MapBatches(_run_tasks_once)"  # idle: "ray::IDLE"
OUTAGE_S = 4.0

logger = logging.getLogger(__name__)


def overrides(tiny_captioner: Path) -> list[str]:
    return [
        "executor.kind=local",
        "executor.progress=false",
        "crawl.shard_size=1",
        "crawl.min_short_side=512",
        "crawl.min_long_side=512",
        "segment.mask_max_side=512",
        "caption.backend=transformers",
        f"caption.model={tiny_captioner}",
        "caption.transformers.device=cpu",
        "caption.max_pixels=12544",
        "caption.sampling.max_new_tokens=48",
    ]


def make_config(run_root: str, scenes: Path, tiny_captioner: Path, *extra: str) -> RunConfig:
    return load_run_config(None, [*overrides(tiny_captioner), *extra], run_root=run_root, sources=[str(scenes)])


def dataset_rows(storage: Storage) -> list[dict]:
    """Every row of every packed dataset shard present (listed, not taken from the manifest), by image id."""
    keys = [o.key for o in storage.list("dataset/") if DATASET_SHARD.match(o.key)]
    rows = [row for key in keys for row in storage.read_parquet(key, columns=ROW_COLUMNS).to_pylist()]
    return sorted(rows, key=lambda r: r["image_id"])


def sha256_of(storage: Storage, key: str) -> str:
    return hashlib.sha256(storage.read_bytes(key)).hexdigest()


def assert_committed_files_intact(storage: Storage) -> None:
    """Whatever a manifest counts exists with the recorded checksum; every final-key Parquet file is whole."""
    layout = RunLayout(storage)
    for stage in SHARD_STAGES:
        for shard_id, entry in layout.manifests(stage).items():
            assert sha256_of(storage, entry.output_key) == entry.output_checksum, f"{stage}/{shard_id} output"
            assert sha256_of(storage, entry.errors_key) == entry.errors_checksum, f"{stage}/{shard_id} errors"
            assert layout.read_output(stage, shard_id).num_rows == entry.output_rows
    if storage.exists(DATASET_MANIFEST_KEY):
        for shard in storage.read_json(DATASET_MANIFEST_KEY)["shards"]:
            assert sha256_of(storage, shard["key"]) == shard["sha256"], shard["key"]
            assert sha256_of(storage, shard["pairs_key"]) == shard["pairs_sha256"], shard["pairs_key"]
    for obj in storage.list():  # final keys only (_tmp/ is not listed): never a torn file
        if obj.key.endswith(".parquet"):
            with storage.filesystem.open_input_file(storage.path(obj.key)) as handle:
                pq.read_metadata(handle)


def assert_matches_clean(storage: Storage, clean: list[dict]) -> None:
    assert_committed_files_intact(storage)
    gaps = check_run(RunLayout(storage))
    assert not gaps, [g.describe() for g in gaps]
    manifest = storage.read_json(DATASET_MANIFEST_KEY)
    assert sorted(s["key"] for s in manifest["shards"]) == sorted(
        o.key for o in storage.list("dataset/") if DATASET_SHARD.match(o.key)
    )
    rows = dataset_rows(storage)
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == NUM_SCENES
    assert rows == clean


def computed(results: list[StageRunResult]) -> dict[str, int]:
    return {r.stage: r.computed_shards for r in results}


def attempt(config: RunConfig) -> tuple[list[StageRunResult] | None, BaseException | None]:
    """A faulted run may finish, finish with failed shards, or stop with an error: all are fine."""
    try:
        return run_pipeline(config), None
    except Exception as exc:
        return None, exc


def wait_for(condition: Callable[[], bool], stop: threading.Event, timeout_s: float = 180.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault-scenes")
    write_scenes(folder, NUM_SCENES, size=(1000, 800))
    return folder


@pytest.fixture(scope="module")
def clean(s3_server, scenes, tiny_captioner) -> list[dict]:
    """The reference: one undisturbed run of the same input and config, on S3."""
    s3_server.client().create_bucket(Bucket="fault-clean")
    config = make_config("s3://fault-clean/run", scenes, tiny_captioner)
    results = run_pipeline(config)
    assert all(not r.failed_shards for r in results)
    storage = Storage(config.run_root)
    assert not check_run(RunLayout(storage))
    rows = dataset_rows(storage)
    assert len(rows) == NUM_SCENES
    assert all(r["regions"] and r["global_caption"] for r in rows)
    return rows


@pytest.fixture(scope="module")
def ray_with_s3(ray_local, s3_server):
    """The session's local Ray, with workers that can reach the test S3 server.

    Workers inherit the raylet's environment, so a cluster started (by an earlier test) before the S3
    fixture exported its credentials cannot read the run root: restart it with them set.
    """
    ray = ray_local
    keys = tuple(s3_server.env())

    @ray.remote(num_cpus=0)
    def worker_env() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in keys}

    if ray.get(worker_env.remote()) != s3_server.env():
        logger.info("restarting the local Ray so that its workers get the S3 test credentials")
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


def _parent_pid() -> int:
    return os.getppid()


def raylet_pid(ray) -> int:
    """Ray workers are children of their raylet: ask one for its parent."""
    return ray.get(ray.remote(num_cpus=0)(_parent_pid).remote())


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    response = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in response.get("Contents", [])]


# Process titles of a worker at work (an idle one reads "ray::IDLE", an idle actor has no ".submit").
AT_WORK = {
    # Stage by stage: crawl, segment and corpus run as _run_tasks_once tasks; between the crawl's dedup and
    # the corpus stage (after caption) such a task can only be a segment shard.
    False: (SEGMENT_TASK_AT_WORK, CAPTION_ACTOR_AT_WORK),
    # Pipelined: crawl, segment and corpus rows are _run_step_once tasks; once every crawl shard is
    # committed, such a task is a segment or a corpus-row shard (both must survive a kill).
    True: ("ray::MapBatches(_run_step_once)", "ray::MapWorker(MapBatches(ChainStep)).submit"),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["stage-by-stage", "pipelined"])
def test_killed_ray_workers(ray_with_s3, s3_server, s3_bucket, scenes, tiny_captioner, clean, pipelined):
    """SIGKILL a shard task's worker and then the caption actor, each while it works on a shard."""
    extra = ["executor.kind=ray", f"executor.pipelined={str(pipelined).lower()}"]
    config = make_config(f"s3://{s3_bucket}/run", scenes, tiny_captioner, *extra)
    client, raylet = s3_server.client(), raylet_pid(ray_with_s3)

    def crawl_done() -> bool:
        if pipelined:  # the dedup manifest is written after the chain: count the crawl commits instead
            return len(s3_keys(client, s3_bucket, "run/crawl/_manifest/")) == NUM_SCENES
        return bool(s3_keys(client, s3_bucket, "run/crawl/_dedup/_manifest.json"))

    task_at_work, actor_at_work = AT_WORK[pipelined]
    killers = [
        ProcessKiller(raylet, task_at_work, armed=crawl_done).start(),
        ProcessKiller(raylet, actor_at_work).start(),
    ]
    try:
        results, error = attempt(config)
    finally:
        for killer in killers:
            killer.stop()
    assert all(k.killed for k in killers), [k.killed for k in killers]
    storage = Storage(config.run_root)
    assert_committed_files_intact(storage)
    rerun = run_pipeline(config)
    logger.info(
        "killed %s; first run %s, failed %s; rerun computed %s",
        [k.killed for k in killers],
        repr(error) if error else computed(results or []),
        [r.failed_shards for r in results or []],
        computed(rerun),
    )
    assert all(not r.failed_shards for r in rerun)
    if error is None and results is not None and not any(r.failed_shards for r in results):
        # Ray retried the task and restarted the actor: the run finished and the rerun has nothing to do.
        assert set(computed(rerun).values()) == {0}
    assert_matches_clean(storage, clean)


def cli_shard_counts(stdout: str) -> dict[str, tuple[int, int, int]]:
    """``[stage] shards: C computed, D already done, F failed`` lines -> {stage: (C, D, F)}."""
    found = re.findall(r"^\[([a-z-]+)\] shards: (\d+) computed, (\d+) already done, (\d+) failed", stdout, re.M)
    return {stage: (int(c), int(d), int(f)) for stage, c, d, f in found}


def test_killed_driver(s3_server, s3_bucket, scenes, tiny_captioner, clean, tmp_path):
    run_root = f"s3://{s3_bucket}/run"
    command = [str(Path(sys.executable).parent / "ps3-engine"), "run", "--run-root", run_root, "--input", str(scenes)]
    for override in overrides(tiny_captioner):
        command += ["--set", override]
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "disabled"}
    client = s3_server.client()
    with (tmp_path / "killed.log").open("w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            done = wait_for(
                lambda: bool(s3_keys(client, s3_bucket, "run/caption/_manifest/")) or driver.poll() is not None,
                threading.Event(),
            )
            assert done and driver.poll() is None, "the driver ended before any caption shard was committed"
            driver.send_signal(signal.SIGKILL)
        finally:
            driver.kill()
            driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL
    captioned = len(s3_keys(client, s3_bucket, "run/caption/_manifest/"))
    leftovers = s3_keys(client, s3_bucket, "run/_tmp/")
    storage = Storage(run_root)
    assert not storage.exists(DATASET_MANIFEST_KEY)
    assert_committed_files_intact(storage)
    # Leftovers of interrupted writes under _tmp/ (real ones, plus a torn copy of a shard and its manifest).
    client.put_object(Bucket=s3_bucket, Key="run/_tmp/torn/caption/part-x.parquet", Body=b"PAR1 torn")
    client.put_object(Bucket=s3_bucket, Key="run/_tmp/torn/caption/_manifest/x.json", Body=b"{")
    for shard_id in RunLayout(storage).manifests("crawl"):
        client.put_object(Bucket=s3_bucket, Key=f"run/_tmp/torn/corpus/part-{shard_id}.parquet", Body=b"PAR1")

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    counts = cli_shard_counts(rerun.stdout)
    logger.info(
        "driver killed with %d caption manifests, %d objects left under _tmp/; rerun (computed, done, failed) %s",
        captioned,
        len(leftovers),
        counts,
    )
    assert counts["crawl"] == (0, NUM_SCENES, 0)
    # `run` streams: a caption shard can commit while segment shards are still to come.
    assert sum(counts["segment"][:2]) == NUM_SCENES and counts["segment"][2] == 0
    assert counts["caption"][1] >= captioned and counts["caption"][2] == 0
    assert sum(counts["caption"][:2]) == NUM_SCENES
    assert s3_keys(client, s3_bucket, "run/_tmp/torn/")  # untouched, and ignored
    assert_matches_clean(storage, clean)


@pytest.mark.parametrize(
    ("failure", "max_attempts"),
    [("reset", 8), ("slowdown", 8), ("reset", 1)],
    ids=["reset", "slowdown", "reset-no-retry"],
)
def test_s3_outage_then_rerun(failure, max_attempts, s3_server, s3_bucket, scenes, tiny_captioner, clean):
    upstream = urlparse(s3_server.endpoint)
    client = s3_server.client()  # straight to the server, past the proxy
    stop = threading.Event()
    with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as proxy:
        config = make_config(
            f"s3://{s3_bucket}/run",
            scenes,
            tiny_captioner,
            f"s3.endpoint_url={proxy.endpoint}",
            f"s3.max_attempts={max_attempts}",
        )

        def outage() -> None:
            if wait_for(lambda: bool(s3_keys(client, s3_bucket, "run/caption/_manifest/")), stop):
                proxy.fail_for(failure, OUTAGE_S)

        trigger = threading.Thread(target=outage, daemon=True)
        trigger.start()
        try:
            results, error = attempt(config)
        finally:
            stop.set()
            trigger.join(timeout=OUTAGE_S + 5)
        assert proxy.failed > 0, "the outage never hit the run"
        storage = Storage(config.run_root)  # the server itself (the environment's endpoint), not the proxy
        assert_committed_files_intact(storage)
        rerun = run_pipeline(config)
    assert all(not r.failed_shards for r in rerun)
    outcome = "raised" if error else ("failed shards" if any(r.failed_shards for r in results or []) else "ok")
    logger.info(
        "%s/%d attempts: %d connections failed; first run %s (%r), failed %s; rerun computed %s",
        failure,
        max_attempts,
        proxy.failed,
        outcome,
        error,
        [r.failed_shards for r in results or []],
        computed(rerun),
    )
    assert_matches_clean(storage, clean)


def test_full_local_disk(tmp_path, scenes, tiny_captioner, clean):
    disk = tmp_path / "disk"
    with contextlib.ExitStack() as stack:
        try:
            volume = stack.enter_context(tmpfs(disk, "340k"))  # room for crawl and segment, not the whole run
        except MountUnavailable as exc:
            pytest.skip(f"cannot mount a small tmpfs to fill up: {exc}")
        config = make_config(str(disk / "run"), scenes, tiny_captioner)
        results, error = attempt(config)
        storage = Storage(config.run_root)
        if error is not None:
            assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)
        else:
            assert results is not None and any(r.failed_shards for r in results)
            messages = [f["message"] for f in storage.read_json("summary.json")["failed_shards"]]
            assert all("No space left on device" in m for m in messages)
        logger.info(
            "full disk: %r; manifests %s; %d bytes of partial writes left under _tmp/",
            error,
            {stage: len(RunLayout(storage).manifests(stage)) for stage in SHARD_STAGES},
            sum(f.stat().st_size for f in (disk / "run" / "_tmp").rglob("*") if f.is_file()),
        )
        assert not storage.exists(DATASET_MANIFEST_KEY)
        assert_committed_files_intact(storage)
        volume.resize("64m")
        rerun = run_pipeline(config)
        assert all(not r.failed_shards for r in rerun)
        logger.info("full disk: rerun computed %s", computed(rerun))
        assert_matches_clean(storage, clean)


class SimulatedCrash(BaseException):
    """Unwinds like a SIGKILL at the injection point: nothing in the pipeline catches a BaseException."""


def test_driver_killed_while_the_dataset_is_repacked(monkeypatch, s3_bucket, scenes, tiny_captioner, clean):
    """A failed caption shard, a partial dataset, then a rerun killed between dataset shards and manifest."""
    config = make_config(f"s3://{s3_bucket}/run", scenes, tiny_captioner)
    storage = Storage(config.run_root)
    commit, write_json = RunLayout.commit_shard, Storage.write_json_atomic

    def commit_fails_for_one_caption_shard(self, task, **kwargs):
        if task.stage == "caption" and task.shard_id.endswith("-00001"):
            raise OSError("injected: the endpoint refused this shard's commit")
        return commit(self, task, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(RunLayout, "commit_shard", commit_fails_for_one_caption_shard)
        first = run_pipeline(config)
    assert [len(r.failed_shards) for r in first] == [0, 0, 1, 0]  # later stages ran on the rest
    partial = storage.read_json(DATASET_MANIFEST_KEY)
    assert sum(split["images"] for split in partial["counts"].values()) == NUM_SCENES - 1
    assert_committed_files_intact(storage)

    def crash_before_the_dataset_manifest(self, key, payload):
        if key == DATASET_MANIFEST_KEY:
            raise SimulatedCrash
        return write_json(self, key, payload)

    with monkeypatch.context() as patch, pytest.raises(SimulatedCrash):
        patch.setattr(Storage, "write_json_atomic", crash_before_the_dataset_manifest)
        run_pipeline(config)
    assert storage.read_json(DATASET_MANIFEST_KEY) == partial  # the crash came before its replacement
    rewritten = [s["key"] for s in partial["shards"] if sha256_of(storage, s["key"]) != s["sha256"]]
    gaps = [g.describe() for g in check_run(RunLayout(storage))]
    logger.info("after the killed repack: shards rewritten under the manifest %s; gaps %s", rewritten, gaps)
    rerun = run_pipeline(config)  # a plain rerun still converges
    assert computed(rerun) == {"crawl": 0, "segment": 0, "caption": 0, "build-corpus": 0}
    assert_matches_clean(storage, clean)
    # What the killed repack left: the old manifest still describes exactly the files it lists; the
    # unfinished build shows only as dataset gaps (stray files, counts behind the corpus stage).
    assert not rewritten, "the previous dataset manifest counted shards rewritten under it"
    assert gaps and {g.split("/", 1)[0] for g in gaps} == {"dataset"}
    assert not check_run(RunLayout(storage)), "the rerun left gaps"

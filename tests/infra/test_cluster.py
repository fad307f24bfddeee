"""A real Ray cluster (``ray start --head`` on loopback) running the pipeline through the job API, S3 run root.

Also validates the cluster manifests in ``infra/cluster/``: they parse, and the RayJob entrypoint is
the command this test submits.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.samples import write_scenes
from ps3_engine.pipeline.submit import WORKING_DIR_EXCLUDES, entrypoint, runtime_env, submit_when_ready, wait_for_job
from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / "infra" / "cluster"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER_DIR / "rayjob.yaml").read_text())


def test_manifests_parse_and_declare_cpu_and_gpu_groups():
    cluster = yaml.safe_load((CLUSTER_DIR / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    job = _rayjob()
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    launcher = yaml.safe_load((CLUSTER_DIR / "aws-cluster-launcher.yaml").read_text())
    assert launcher["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    for text in (p.read_text() for p in CLUSTER_DIR.glob("*.yaml")):
        assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()


def test_submit_builds_the_runtime_env_without_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    env = runtime_env()
    assert env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9"
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"] and ".venv" in env["excludes"]
    assert runtime_env(forward_credentials=True)["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "do-not-ship"
    assert entrypoint(["run", "--config", "a b.yaml"]) == "ps3-engine run --config 'a b.yaml'"
    with pytest.raises(ValueError, match="nothing to submit"):
        entrypoint([])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate Ray cluster started like a real head node, with the dashboard's job API."""
    temp_dir = tmp_path_factory.mktemp("rayhead")
    port, dashboard = _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            # Every port explicit: the defaults are fixed numbers that another Ray on this machine may hold,
            # and a head whose dashboard agent cannot bind never accepts jobs.
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    # A head node's job agent comes up a few seconds after `ray start` returns: wait for a trivial job.
    client = JobSubmissionClient(address)
    probe = submit_when_ready(client, entrypoint="true")
    wait_for_job(client, probe, timeout_s=120)
    yield address, f"127.0.0.1:{port}", env
    _stop_cluster(temp_dir)


def _stop_cluster(temp_dir: Path) -> None:
    """Kill only this cluster's processes (their command lines name its temp dir).

    ``ray stop`` would kill every Ray on the machine, including the session's own local Ray.
    """
    import psutil

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(temp_dir) in cmdline:
            mine.append(process)
    for process in mine:
        try:
            for child in process.children(recursive=True):
                child.kill()
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(mine, timeout=30)


def test_ray_job_submit_runs_the_pipeline_into_s3(ray_head, s3_server, s3_bucket, tiny_captioner, tmp_path):
    dashboard, _, env = ray_head
    client = s3_server.client()
    images = tmp_path / "images"
    write_scenes(images, 3, size=(1100, 800))
    for path in sorted(images.iterdir()):
        client.upload_file(str(path), s3_bucket, f"inputs/{path.name}")
    run_root = f"s3://{s3_bucket}/runs/cluster"
    overrides = [
        "segment.backend=classical",
        "segment.mask_max_side=512",
        "caption.backend=transformers",
        f"caption.model={tiny_captioner}",
        "caption.transformers.device=cpu",
        "caption.max_pixels=12544",
        "caption.sampling.max_new_tokens=40",
        "crawl.min_short_side=512",
        "crawl.min_long_side=512",
        "crawl.shard_size=2",
        "executor.progress=false",
    ]
    job_entry = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert job_entry[:2] == ["ps3-engine", "run"]
    command = [
        *job_entry[1:],
        "--run-root",
        run_root,
        "--input",
        f"s3://{s3_bucket}/inputs/",
        *[arg for o in overrides for arg in ("--set", o)],
    ]
    # The manifest's entrypoint, plus this test's run root, inputs and CPU-sized overrides.
    assert entrypoint(command).startswith(_rayjob()["spec"]["entrypoint"])
    submit_env = {**env, **s3_server.env()}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps({"excludes": WORKING_DIR_EXCLUDES, "env_vars": s3_server.env()}),
            "--",
            *shlex.split(entrypoint(command)),
        ],
        env=submit_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    storage = Storage(run_root, S3Settings(endpoint_url=s3_server.endpoint))
    manifest = storage.read_json("dataset/manifest.json")
    images_in_dataset = sum(split["images"] for split in manifest["counts"].values())
    assert images_in_dataset == 3
    summary = storage.read_json("summary.json")
    assert set(summary["stages"]) == {"crawl", "segment", "caption", "build-corpus"}
    # The same run through the convenience command is a no-op rerun: every shard is done.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    argv = ["submit", "--address", dashboard, "--working-dir", str(ROOT), "--forward-credentials", "--timeout", "300"]
    assert main([*argv, "--", *command]) == 0
    rerun = storage.read_json("summary.json")
    assert all(stage["computed_shards"] == 0 for stage in rerun["stages"].values())

    # A tiny PS3 pre-training job on that corpus, checkpointing to S3, through the same job API.
    tokenizer = build_tiny_text_tokenizer(tmp_path / "tokenizer")
    train = ["train", "ps3", "--corpus", run_root, "--recipe", "debug", "--storage-path", f"s3://{s3_bucket}/training"]
    train += ["--name", "cluster-debug", "--tokenizer", str(tokenizer)]
    train += ["--set", "num_workers=1", "--set", "batch_size_per_worker=2", "--set", "max_steps=2"]
    assert main([*argv, "--", *train]) == 0
    checkpoints = [o.key for o in Storage(f"s3://{s3_bucket}/training", storage.s3).list("cluster-debug/")]
    assert any(key.endswith("state.pt") for key in checkpoints)

    # And a tiny VILA-HD tuning job on grounded samples generated from the same corpus.
    vila = ["train", "vila-hd", "--data", run_root, "--recipe", "debug", "--storage-path", f"s3://{s3_bucket}/training"]
    vila += ["--name", "cluster-vila", "--set", "num_workers=1", "--set", "batch_size_per_worker=1"]
    assert main([*argv, "--", *vila, "--set", "max_steps=2"]) == 0
    checkpoints = [o.key for o in Storage(f"s3://{s3_bucket}/training", storage.s3).list("cluster-vila/")]
    assert any(key.endswith("state.pt") for key in checkpoints)

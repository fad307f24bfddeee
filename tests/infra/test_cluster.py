"""A real Ray cluster (``ray start --head`` on loopback) running the pipeline through the job API, S3 run root.

Also validates the cluster manifests in ``infra/cluster/`` against KubeRay's fields (tests/infra/
kuberay_schema.py) and Ray's own cluster-launcher schema, the container images they name against
docker/Dockerfile(.gpu), and the RayJob entrypoint against the command this test submits; and that
``ps3-engine submit`` refuses a job without input in the client and reports a failed job's log tail.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from dockerfile_parse import DockerfileParser
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.samples import write_scenes
from ps3_engine.pipeline.submit import (
    WORKING_DIR_EXCLUDES,
    entrypoint,
    image_name,
    run_submit,
    runtime_env,
    submit_when_ready,
    validate_command,
    wait_for_job,
)
from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer
from tests.infra.kuberay_schema import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / "infra" / "cluster"
KUBERAY_MANIFESTS = ("raycluster.yaml", "rayjob.yaml")
PRODUCTION = "configs/production.yaml"
IMAGE_WORKDIR = "/home/ray/ps3-engine"  # docker/Dockerfile's WORKDIR: the repository copy in the image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER_DIR / "rayjob.yaml").read_text())


def _cluster_specs() -> list[dict]:
    return [yaml.safe_load((CLUSTER_DIR / "raycluster.yaml").read_text())["spec"], _rayjob()["spec"]["rayClusterSpec"]]


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
    # One cluster shape: the RayJob's ephemeral cluster is the RayCluster's spec, field for field.
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_gpu_group_has_shared_memory_gpu_toleration_and_local_disk():
    for spec in _cluster_specs():
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")["template"]["spec"]
        shm = next(v for v in gpu["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        container = gpu["containers"][0]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            assert "ephemeral-storage" in group["template"]["spec"]["containers"][0]["resources"]["requests"]


def _kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = SCHEMAS[kind]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifests_match_kuberays_fields(name):
    manifest = yaml.safe_load((CLUSTER_DIR / name).read_text())
    errors = [e.message for e in _kuberay_validator(manifest["kind"]).iter_errors(manifest)]
    assert errors == []


def test_every_cluster_file_is_validated():
    """A new file in infra/cluster/ must be added to a validation below, or this fails."""
    assert {p.name for p in CLUSTER_DIR.glob("*.yaml")} == {*KUBERAY_MANIFESTS, "aws-cluster-launcher.yaml"}


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec", "workerGroupSpecs", 1, "template", "spec"), ("tolerations", "toleration")),
        (("spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0), ("volumeMounts", "volumeMount")),
        (("spec", "workerGroupSpecs", 0), ("minReplicas", "minReplica")),
        (("spec", "headGroupSpec", "template", "spec", "containers", 0, "resources"), ("requests", "request")),
        (("spec",), ("enableInTreeAutoscaling", "enableInTreeAutoScaling")),
    ],
)
def test_a_typo_in_a_manifest_fails_validation(path, typo):
    manifest = yaml.safe_load((CLUSTER_DIR / "raycluster.yaml").read_text())
    node = manifest
    for key in path:
        node = node[key]
    good, bad = typo
    node[bad] = node.pop(good)
    messages = [e.message for e in _kuberay_validator("RayCluster").iter_errors(manifest)]
    assert any(bad in m and "unexpected" in m.lower() for m in messages), messages


def test_rayjob_typo_fails_validation():
    job = _rayjob()
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert not _kuberay_validator("RayJob").is_valid(job)


def test_cluster_launcher_matches_rays_own_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    launcher = yaml.safe_load((CLUSTER_DIR / "aws-cluster-launcher.yaml").read_text())
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))
    launcher["docker"]["imgae"] = launcher["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="imgae"):
        jsonschema.validate(launcher, json.loads(schema_path.read_text()))


def _dockerfile(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=(ROOT / "docker" / name).open("rb"))


@pytest.mark.parametrize(("name", "variant"), [("Dockerfile", "cpu"), ("Dockerfile.gpu", "gpu")])
def test_dockerfiles_build_on_the_ray_image_matching_our_ray_and_python(name, variant):
    """No docker daemon here: check what the build would rest on, not the build itself."""
    dockerfile = _dockerfile(name)
    repository, tag = dockerfile.baseimage.split(":")
    assert repository == "rayproject/ray"
    ray_version, python_tag, platform = tag.split("-")
    assert ray_version == ray.__version__ == _rayjob()["spec"]["rayClusterSpec"]["rayVersion"]
    assert python_tag == f"py{sys.version_info.major}{sys.version_info.minor}"
    assert platform == variant
    runs = " ".join(i["value"] for i in dockerfile.structure if i["instruction"] == "RUN")
    extras = "models,gpu,documents" if variant == "gpu" else "models,documents"
    assert f"bash scripts/setup.sh --system {extras}" in runs
    assert "/opt/wheels" not in dockerfile.content and "find-links" not in dockerfile.content
    workdirs = [i["value"] for i in dockerfile.structure if i["instruction"] == "WORKDIR"]
    assert workdirs == [IMAGE_WORKDIR]
    assert f"-t {image_name(variant)} " in dockerfile.content
    # The CPU image takes torch's CPU build (PyPI's is the CUDA one); the GPU image keeps vLLM's CUDA torch.
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert dockerfile.envs.get("PIP_EXTRA_INDEX_URL") == (cpu_index if variant == "cpu" else None)
    torch_pin = next(r for r in _models_extra() if re.match(r"torch\s*==", r))
    assert SpecifierSet(torch_pin.split("torch", 1)[1]).contains(Version("2.14.1+cpu"))
    assert Version("2.14.1+cpu") > Version("2.14.1")


def _models_extra() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["models"]


def test_manifests_name_the_one_image(monkeypatch):
    monkeypatch.delenv("PS3_ENGINE_IMAGE", raising=False)
    for spec in _cluster_specs():
        assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == image_name("cpu")
        for group in spec["workerGroupSpecs"]:
            image = group["template"]["spec"]["containers"][0]["image"]
            assert image == image_name("gpu" if group["groupName"] == "gpu" else "cpu")
    launcher = yaml.safe_load((CLUSTER_DIR / "aws-cluster-launcher.yaml").read_text())
    assert launcher["docker"]["image"] == image_name("cpu")
    assert launcher["available_node_types"]["gpu_worker"]["docker"]["worker_image"] == image_name("gpu")
    monkeypatch.setenv("PS3_ENGINE_IMAGE", "registry.example/ps3-engine:dev")
    assert image_name("gpu") == "registry.example/ps3-engine:dev-gpu"
    assert runtime_env(image=image_name("gpu"))["image_uri"] == "registry.example/ps3-engine:dev-gpu"


def _job_command_here() -> list[str]:
    """The RayJob's entrypoint as it runs from a checkout: the image's config path mapped to the repo."""
    command = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert command[:2] == ["ps3-engine", "run"]
    return [arg.replace(f"{IMAGE_WORKDIR}/", "") for arg in command[1:]]


def test_the_rayjob_command_and_production_config_pass_the_client_check():
    validate_command(_job_command_here(), ROOT)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["run", "--config", "configs/production.yaml"], "the job has no input: add --input SRC"),
        (["crawl", "--config", "configs/production.yaml"], "the job has no input"),
        (["run", "--config", PRODUCTION, "--input", "x", "--set", "crawl.nope=1"], "run config is invalid"),
        (["run", "--config", "configs/missing.yaml", "--input", "x"], "is not a file"),
        (["run", "--bogus"], "command line is invalid: .*unrecognized arguments: --bogus"),
    ],
)
def test_submit_refuses_a_bad_job_in_the_client_with_one_line(command, message, capsys):
    # A closed port: had the client tried to reach a cluster, the error would be a connection error.
    argv = ["submit", "--address", f"http://127.0.0.1:{_free_port()}", "--working-dir", str(ROOT), "--", *command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ps3-engine: error: the job")
    assert re.search(message, err), err


def test_submit_refuses_a_new_run_root_without_input_but_continues_an_existing_run(tmp_path):
    fresh = tmp_path / "new-run"
    with pytest.raises(ValueError, match="the job has no input"):
        validate_command(["crawl", "--run-root", str(fresh)], ROOT)
    existing = tmp_path / "old-run"
    existing.mkdir()
    (existing / "run.json").write_text("{}")
    validate_command(["segment", "--run-root", str(existing)], ROOT)
    validate_command(["crawl", "--run-root", str(existing)], ROOT)


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


# Four Ray jobs in one test (the pipeline, its no-op rerun, PS3 and VILA-HD training): twice the per-test default.
@pytest.mark.timeout(1200)
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
    # The manifest's entrypoint without its placeholder input, plus this test's run root, inputs and
    # CPU-sized overrides.
    job_entry = _job_command_here()
    at = job_entry.index("--input")
    command = [
        *job_entry[:at],
        *job_entry[at + 2 :],
        "--run-root",
        run_root,
        "--input",
        f"s3://{s3_bucket}/inputs/",
        *[arg for o in overrides for arg in ("--set", o)],
    ]
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
    # Recorded as a rerun that computed nothing; the figures stay those of the computation (runner._summary_entry).
    assert all("noop_rerun_at" in stage for stage in rerun["stages"].values())
    assert {name: stage["computed_shards"] for name, stage in rerun["stages"].items()} == {
        name: stage["computed_shards"] for name, stage in summary["stages"].items()
    }

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


def test_a_failed_job_ends_with_its_log_tail_and_status(ray_head, tmp_path):
    dashboard, _, _ = ray_head
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    missing = tmp_path / "no-such-run"
    out, err = io.StringIO(), io.StringIO()
    command = ["status", str(missing)]
    code = run_submit(dashboard, command, working_dir=str(working_dir), timeout_s=180, out=out, err=err)
    assert code == 1
    # The log was followed as it was written, and the failure report repeats its end with Ray's status.
    assert "no-such-run" in out.getvalue()
    report = err.getvalue()
    assert re.search(r"--- last \d+ log lines of job raysubmit_\w+ ---", report), report
    tail = report.split("log lines of job", 1)[1]
    assert "no-such-run" in tail
    assert re.search(r"job raysubmit_\w+: FAILED: .*exit code", report), report

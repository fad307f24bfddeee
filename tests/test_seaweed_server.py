"""The suite's SeaweedFS S3 server on a nearly full disk (tests/support/seaweed.py).

A CI machine whose disk had a little under 1% of its size free ran the suite with every S3 write failing
after minutes of retries (SeaweedFS's default read-only threshold). The disk here is a 4 GiB ext4 image on a
loop device with 30 MiB free: under 1% of its size, over the server's absolute threshold. It needs root and
loop devices; elsewhere it skips.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.faults import MountUnavailable, nearly_full_disk
from tests.support.seaweed import start_seaweed


@pytest.fixture
def disk(tmp_path):
    try:
        with nearly_full_disk(tmp_path / "disk", "4G", free_bytes=30 * 2**20) as path:
            yield path
    except MountUnavailable as exc:
        pytest.skip(f"cannot mount a small file system to fill up: {exc}")


@pytest.mark.slow
def test_the_test_server_takes_writes_with_under_one_percent_of_the_disk_free(disk):
    usage = shutil.disk_usage(disk)
    assert usage.free < usage.total / 100
    server = start_seaweed(disk / "seaweed")
    try:
        client = server.client(max_attempts=1)
        client.create_bucket(Bucket="nearly-full")
        client.put_object(Bucket="nearly-full", Key="a/b.bin", Body=b"x" * 100_000)
        assert client.get_object(Bucket="nearly-full", Key="a/b.bin")["Body"].read() == b"x" * 100_000
    finally:
        server.stop()


@pytest.mark.slow
def test_a_disk_too_full_to_write_stops_the_server_start_in_one_line(disk):
    subprocess.run(["fallocate", "-l", str(shutil.disk_usage(disk).free - 2**20), str(disk / "more")], check=True)
    with pytest.raises(RuntimeError, match=r"refuses writes .* MiB free under"):
        start_seaweed(disk / "seaweed")

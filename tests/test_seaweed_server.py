"""The suite's SeaweedFS S3 server on a nearly full disk (tests/support/seaweed.py).

A CI machine whose disk had a little under 1% of its size free ran the suite with every S3 write failing
after two minutes of retries (SeaweedFS's default read-only threshold). The disk here is a small ext4
image on a loop device, filled to leave 30 MiB free: under 1% of its 4 GiB, over the server's absolute
threshold. It needs root and loop devices; elsewhere it skips.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.seaweed import start_seaweed


@pytest.fixture
def nearly_full_disk(tmp_path):
    image, mount_point = tmp_path / "disk.img", tmp_path / "disk"
    mount_point.mkdir()
    # A sparse image; fallocate inside it reserves ext4 blocks without writing them, so the image stays small.
    subprocess.run(["truncate", "-s", "4G", str(image)], check=True)
    made = subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], capture_output=True, text=True, check=False)
    mounted = (
        made.returncode == 0
        and (
            subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], capture_output=True, check=False)
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("needs root and a loop device to mount a small file system")
    try:
        free = shutil.disk_usage(mount_point).free
        subprocess.run(["fallocate", "-l", str(free - 30 * 2**20), str(mount_point / "fill")], check=True)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        image.unlink(missing_ok=True)


@pytest.mark.slow
def test_the_test_server_takes_writes_with_under_one_percent_of_the_disk_free(nearly_full_disk):
    usage = shutil.disk_usage(nearly_full_disk)
    assert usage.free < usage.total / 100
    server = start_seaweed(nearly_full_disk / "seaweed")
    try:
        client = server.client(max_attempts=1)
        client.create_bucket(Bucket="nearly-full")
        client.put_object(Bucket="nearly-full", Key="a/b.bin", Body=b"x" * 100_000)
        assert client.get_object(Bucket="nearly-full", Key="a/b.bin")["Body"].read() == b"x" * 100_000
    finally:
        server.stop()


@pytest.mark.slow
def test_a_disk_too_full_to_write_stops_the_server_start_in_one_line(nearly_full_disk):
    fill = nearly_full_disk / "fill2"
    subprocess.run(["fallocate", "-l", str(shutil.disk_usage(nearly_full_disk).free - 2**20), str(fill)], check=True)
    with pytest.raises(RuntimeError, match=r"refuses writes .* MiB free under"):
        start_seaweed(nearly_full_disk / "seaweed")

"""The storage seam behaves the same on a local folder and on a real S3 server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ps3_engine.infra.storage import Storage, list_uri, read_uri_bytes, resolve_filesystem, uri_is_dir


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"s3://{bucket}/prefix/root")


def test_atomic_write_read_list_delete(storage):
    checksum = storage.write_bytes_atomic("a/b/c.bin", b"hello")
    assert checksum == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    storage.write_json_atomic("a/x.json", {"k": [1, 2]})
    assert storage.read_bytes("a/b/c.bin") == b"hello"
    assert storage.read_json("a/x.json") == {"k": [1, 2]}
    assert [(o.key, o.size) for o in storage.list("a/")] == [
        ("a/b/c.bin", 5),
        ("a/x.json", len(storage.read_bytes("a/x.json"))),
    ]
    assert storage.exists("a/b/c.bin") and not storage.exists("a/b/missing")
    assert storage.list("_tmp/") == [] and storage.list("nothing/") == []
    storage.delete("a/b/c.bin")
    assert not storage.exists("a/b/c.bin")


def test_overwrite_replaces_whole_object(storage):
    storage.write_bytes_atomic("k", b"first version, long")
    storage.write_bytes_atomic("k", b"second")
    assert storage.read_bytes("k") == b"second"


def test_parquet_round_trip_and_checksum(storage):
    table = pa.table({"x": pa.array([1, 2, 3], pa.int32()), "y": ["a", "b", None]})
    checksum = storage.write_parquet_atomic("t/part-0.parquet", table)
    assert storage.read_parquet("t/part-0.parquet").equals(table)
    assert storage.read_parquet("t/part-0.parquet", columns=["y"]).column_names == ["y"]
    import hashlib

    assert checksum == hashlib.sha256(storage.read_bytes("t/part-0.parquet")).hexdigest()


def test_tmp_leftovers_are_invisible_and_cleaned(storage):
    storage.write_bytes_atomic("_tmp/deadbeef/crawl/part-1.parquet", b"half written")
    storage.write_bytes_atomic("crawl/part-0.parquet", b"done")
    assert [o.key for o in storage.list()] == ["crawl/part-0.parquet"]
    assert storage.cleanup_tmp() == 1


def test_storage_pickles_without_its_filesystem(storage):
    import pickle

    storage.write_bytes_atomic("p", b"1")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_bytes("p") == b"1" and clone.root_uri == storage.root_uri


def test_uri_helpers_on_s3(s3_bucket, s3_server):
    client = s3_server.client()
    for key in ("src/a.jpg", "src/sub/b.png", "other/c.jpg"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    assert list_uri(f"s3://{s3_bucket}/src") == [f"s3://{s3_bucket}/src/a.jpg", f"s3://{s3_bucket}/src/sub/b.png"]
    assert read_uri_bytes(f"s3://{s3_bucket}/src/a.jpg") == b"src/a.jpg"
    assert uri_is_dir(f"s3://{s3_bucket}/src")
    assert not uri_is_dir(f"s3://{s3_bucket}/src/a.jpg")


def test_bad_uris_are_rejected_clearly():
    with pytest.raises(ValueError, match="unsupported storage URI scheme"):
        resolve_filesystem("gs://bucket/x")
    with pytest.raises(ValueError, match="no bucket"):
        resolve_filesystem("s3:///x")

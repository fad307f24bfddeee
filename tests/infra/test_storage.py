"""The storage seam behaves the same on a local folder and on a real S3 server."""

from __future__ import annotations

import pyarrow as pa
import pytest

from ps3_engine.infra.storage import (
    Storage,
    StorageError,
    list_uri,
    read_uri_bytes,
    resolve_filesystem,
    uri_is_dir,
)


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
    assert storage.list() == [] or [o.key for o in storage.list()] == ["crawl/part-0.parquet"]


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


def s3_objects(s3_server, bucket: str, prefix: str = "") -> list[tuple[str, int]]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted((o["Key"], o["Size"]) for page in pages for o in page.get("Contents", []))


def test_every_byte_of_an_s3_path_reaches_the_server(s3_bucket, s3_server):
    """``#``, ``?``, ``%`` and spaces are key characters, not URL syntax: exp#1 and exp#2 are two places."""
    roots = ["runs/exp#1", "runs/exp#2", "runs/q?x=1", "runs/sp ace%20", "runs/é+plus"]
    for number, root in enumerate(roots):
        storage = Storage(f"s3://{s3_bucket}/{root}")
        storage.write_bytes_atomic("ckpt/step.bin", str(number).encode())
        assert storage.read_bytes("ckpt/step.bin") == str(number).encode()
    stored = [key for key, _ in s3_objects(s3_server, s3_bucket, "runs/")]
    assert stored == sorted(f"{r}/ckpt/step.bin" for r in roots)
    # The path a training launch hands to Ray Train with our filesystem keeps the fragment too.
    assert resolve_filesystem(f"s3://{s3_bucket}/ckpt#fresh/")[1] == f"{s3_bucket}/ckpt#fresh"


def test_s3_source_prefix_with_hash_in_a_name(s3_bucket, s3_server):
    s3_server.client().put_object(Bucket=s3_bucket, Key="src/scene#1.jpg", Body=b"one")
    s3_server.client().put_object(Bucket=s3_bucket, Key="src/scene.jpg", Body=b"plain")
    listed = list_uri(f"s3://{s3_bucket}/src")
    assert listed == [f"s3://{s3_bucket}/src/scene#1.jpg", f"s3://{s3_bucket}/src/scene.jpg"]
    assert read_uri_bytes(listed[0]) == b"one"


def test_local_paths_keep_hash_characters(tmp_path):
    Storage(str(tmp_path / "exp#1")).write_bytes_atomic("k", b"1")
    Storage(str(tmp_path / "exp#2")).write_bytes_atomic("k", b"2")
    assert (tmp_path / "exp#1" / "k").read_bytes() == b"1" and (tmp_path / "exp#2" / "k").read_bytes() == b"2"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/runs//exp", "empty path segment"),
        ("s3://bad bucket/x", "not a valid bucket name"),
        ("s3://b#1/x", "not a valid bucket name"),
        ("s3://bucket/runs/../exp", r"'\.' or '\.\.' segment"),
        ("file://host/x", "names a host"),
    ],
)
def test_paths_storage_cannot_address_are_refused_with_the_path(uri, message):
    with pytest.raises(ValueError, match=message) as raised:
        resolve_filesystem(uri)
    assert repr(uri) in str(raised.value)


def test_atomic_writes_leave_no_directory_markers_on_s3(s3_bucket, s3_server):
    """Each write once left ``_tmp/<uuid>/<dir>/`` markers behind: 5 writes, 10 objects."""
    storage = Storage(f"s3://{s3_bucket}/run")
    keys = [f"crawl/part-{n}.parquet" for n in range(3)] + ["crawl/_manifest/0.json", "summary.json"]
    for key in keys:
        storage.write_bytes_atomic(key, b"data")
    committed = sorted((f"run/{key}", 4) for key in keys)
    assert s3_objects(s3_server, s3_bucket) == committed
    s3_server.client().put_object(Bucket=s3_bucket, Key="run/_tmp/torn/caption/part-x.parquet", Body=b"PAR1")
    assert storage.cleanup_tmp() == 1
    assert s3_objects(s3_server, s3_bucket) == committed


def test_damaged_objects_are_named_in_errors(storage):
    storage.write_json_atomic("crawl/_manifest/0001.json", {"shard_id": "0001"})
    storage.write_bytes_atomic("crawl/_manifest/0001.json", storage.read_bytes("crawl/_manifest/0001.json")[:7])
    with pytest.raises(StorageError, match=r"crawl/_manifest/0001\.json is not valid JSON"):
        storage.read_json("crawl/_manifest/0001.json")
    storage.write_parquet_atomic("crawl/part-0001.parquet", pa.table({"x": list(range(1000))}))
    data = storage.read_bytes("crawl/part-0001.parquet")
    storage.write_bytes_atomic("crawl/part-0001.parquet", data[: len(data) // 2])
    with pytest.raises(StorageError, match=r"could not read Parquet .*crawl/part-0001\.parquet"):
        storage.read_parquet("crawl/part-0001.parquet")
    with pytest.raises(FileNotFoundError, match=r"crawl/part-missing\.parquet does not exist"):
        storage.read_parquet("crawl/part-missing.parquet")

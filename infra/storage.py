"""The one storage seam: a run root (or any source URI) on local disk or ``s3://bucket/prefix``.

Everything above this module talks in *keys* relative to a root (``crawl/part-0001.parquet``);
only this module knows whether a key lives on a local disk or in an S3 bucket. Both are served by
``pyarrow.fs`` so the same code path (and the same atomic-commit discipline) covers both:

* data is first written to ``_tmp/<uuid>/<key>`` and then moved to its final key, so a reader never
  sees a half-written object under a final key (local: ``rename``; S3: server-side copy, then a
  delete that leaves no directory marker);
* S3 credentials come from the environment or the instance role, never from config files; the
  endpoint may be overridden for S3-compatible servers (SeaweedFS, MinIO, moto) via config or
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

TMP_PREFIX = "_tmp"


class S3Settings(BaseModel):
    """How to reach S3. Credentials are deliberately absent: they come from the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": settings.resolved_region(),
        "connect_timeout": settings.connect_timeout_s,
        "request_timeout": settings.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
    }
    endpoint = settings.resolved_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


# Bucket names as S3 accepts them (including legacy upper-case and underscore names in us-east-1).
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


class StorageError(OSError):
    """A storage operation failed; the message names the object (full URI) and the cause."""


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number of ``exc``; pyarrow often gives it only in its message (``[errno 28]``)."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int):
        return number
    found = re.search(r"\[errno (\d+)\]", str(exc), flags=re.IGNORECASE)
    return int(found.group(1)) if found else None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> ``("bucket", "key/prefix")``, every byte of the key kept as given.

    S3 URIs are not URLs: ``#``, ``?``, ``%`` and spaces are ordinary key characters, so the URI is split
    by hand rather than by ``urllib.parse`` (which drops everything from ``#`` on). A trailing ``/`` is
    dropped (``s3://b/runs/`` and ``s3://b/runs`` name one prefix).

    Raises:
        ValueError: no bucket, a bucket name S3 would refuse, or an empty path segment (``a//b``), which
            pyarrow cannot address; the message quotes the URI.
    """
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"S3 URI {uri!r}: {bucket!r} is not a valid bucket name")
    key = key.rstrip("/")
    if "//" in key or key.startswith("/"):
        raise ValueError(f"S3 URI {uri!r} has an empty path segment ('//'); S3 keys with one are not supported")
    if any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"S3 URI {uri!r} has a '.' or '..' segment; write the prefix without it")
    return bucket, key


def resolve_filesystem(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a local path, ``file://`` URI or ``s3://`` URI to a pyarrow filesystem and a path in it.

    The returned path holds every character of the user's path (see :func:`split_s3_uri`); local paths
    are made absolute only.

    Raises:
        ValueError: an unsupported scheme or a malformed S3 URI (the message quotes the URI).
    """
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        return _s3_filesystem(s3 or S3Settings()), f"{bucket}/{key}" if key else bucket
    if uri.startswith("file://"):
        local = uri.removeprefix("file://")
        if not local.startswith("/"):
            raise ValueError(f"file URI {uri!r} names a host; use file:///absolute/path or a plain path")
        uri = local
    if "://" in uri:
        raise ValueError(f"unsupported storage URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def parquet_bytes(table: pa.Table) -> memoryview:
    """``table`` as one Parquet file in memory.

    Columns are zstd-compressed except binary ones (image bytes, JPEG crops): those are already
    compressed, and zstd would cost CPU (about 3 ms per 4K JPEG) for nothing.
    """
    compression = {
        field.name: "none" if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type) else "zstd"
        for field in table.schema
    }
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression or "zstd", row_group_size=64)
    return memoryview(sink.getvalue())


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # Filled by Storage.list_versions only: ``version`` (size and write time) changes when the object is
    # rewritten in another second (S3) or nanosecond (local); ``modified`` is the store's write time.
    version: str = ""
    modified: datetime | None = None


class Storage:
    """Keys under one root URI, with atomic writes. Picklable: it rebuilds its filesystem lazily."""

    def __init__(self, root_uri: str, s3: S3Settings | None = None) -> None:
        self.root_uri = root_uri.rstrip("/") if root_uri not in ("/", "") else root_uri
        self.s3 = s3 or S3Settings()
        self._fs: pafs.FileSystem | None = None
        self._base: str | None = None
        self._client: Any = None  # boto3 S3 client, built on first use (not picklable)

    def __getstate__(self) -> dict[str, Any]:
        return {"root_uri": self.root_uri, "s3": self.s3}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root_uri"], state["s3"])

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    @property
    def is_s3(self) -> bool:
        return is_s3_uri(self.root_uri)

    @property
    def filesystem(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs, self._base = resolve_filesystem(self.root_uri, self.s3)
        return self._fs

    @property
    def base_path(self) -> str:
        self.filesystem  # noqa: B018 - resolves _base
        assert self._base is not None
        return self._base

    def path(self, key: str) -> str:
        """Path of ``key`` inside :attr:`filesystem`."""
        return f"{self.base_path}/{key.lstrip('/')}" if key else self.base_path

    def uri(self, key: str) -> str:
        return f"{self.root_uri}/{key.lstrip('/')}"

    def child(self, key: str) -> Storage:
        return Storage(self.uri(key), self.s3)

    # -- reads ---------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def info(self, key: str) -> ObjectInfo | None:
        """Size of the file at ``key``, or None when there is none (one request)."""
        with self._naming(key, "stat"):
            found = self.filesystem.get_file_info(self.path(key))
        return ObjectInfo(key, found.size or 0) if found.type == pafs.FileType.File else None

    def read_bytes(self, key: str) -> bytes:
        with self._naming(key, "read"), self.filesystem.open_input_stream(self.path(key)) as stream:
            return stream.read()

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri(key)} is not valid JSON ({len(data)} bytes; truncated?): {exc}") from exc

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        with self._naming(key, "read Parquet"), self.filesystem.open_input_file(self.path(key)) as handle:
            return pq.read_table(handle, columns=columns)

    @contextlib.contextmanager
    def _naming(self, key: str, action: str) -> Iterator[None]:
        """Re-raise storage and decoding failures as :class:`StorageError` naming the object's URI.

        pyarrow's own messages name a buffer (``'<Buffer>'``) or only the bucket-relative path, which
        leaves a user with no file to look at.
        """
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.uri(key)} does not exist") from exc
        except (OSError, pa.ArrowException, BotoCoreError, ClientError) as exc:
            error = StorageError(f"could not {action} {self.uri(key)}: {exc}")
            # Keep the cause's errno (ENOSPC, EACCES...): callers decide on it whether a rerun can help.
            error.errno = _errno_of(exc)
            raise error from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All files under ``prefix`` (recursive), as keys relative to the root, sorted."""
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        base = self.base_path.rstrip("/") + "/"
        with self._naming(prefix, "list"):
            infos = self.filesystem.get_file_info(selector)
        found = [ObjectInfo(info.path.removeprefix(base), info.size or 0) for info in infos if info.is_file]
        return sorted((obj for obj in found if not obj.key.startswith(TMP_PREFIX + "/")), key=lambda o: o.key)

    def list_versions(self, prefix: str = "", recursive: bool = True) -> list[ObjectInfo]:
        """Like :meth:`list`, with each object's version tag and write time (same number of requests).

        ``recursive=False`` lists only the files directly under ``prefix`` (on S3 a delimiter listing, so
        the objects of sub-folders are not paged through). The version is the size and write time
        (S3: ``LastModified``, whole seconds on most servers; local: ns): run state compares versions to
        know which objects changed since it last read them, without reading them.
        """
        selector = pafs.FileSelector(self.path(prefix), recursive=recursive, allow_not_found=True)
        base = self.base_path.rstrip("/") + "/"
        with self._naming(prefix, "list"):
            infos = self.filesystem.get_file_info(selector)
        found = [
            ObjectInfo(
                info.path.removeprefix(base),
                info.size or 0,
                f"{info.size}-{info.mtime_ns}",
                datetime.fromtimestamp(info.mtime_ns / 1e9, UTC) if info.mtime_ns is not None else None,
            )
            for info in infos
            if info.is_file
        ]
        return sorted((obj for obj in found if not obj.key.startswith(TMP_PREFIX + "/")), key=lambda o: o.key)

    # -- writes --------------------------------------------------------------------------------
    def write_bytes_atomic(self, key: str, data: bytes | memoryview) -> str:
        """Write ``data`` to a temporary key, then move it to ``key``. Returns its sha256.

        On S3 the move is a server-side copy and a plain ``DeleteObject`` of the temporary key: pyarrow's
        own move (and delete) leaves a 0-byte directory marker for every folder it empties, which made
        every write leave marker objects under ``_tmp/``.
        """
        tmp_dir = f"{TMP_PREFIX}/{uuid.uuid4().hex}"
        tmp_key = f"{tmp_dir}/{key}"
        fs = self.filesystem
        final_path, tmp_path = self.path(key), self.path(tmp_key)
        with self._naming(key, "write"):
            if not self.is_s3:
                fs.create_dir(os.path.dirname(tmp_path), recursive=True)
                fs.create_dir(os.path.dirname(final_path), recursive=True)
            with fs.open_output_stream(tmp_path) as out:
                out.write(data)
            if self.is_s3:
                fs.copy_file(tmp_path, final_path)
                try:
                    self._delete_s3_objects([tmp_path])
                except (StorageError, BotoCoreError, ClientError) as exc:
                    # The object is committed; a temporary copy left behind is invisible to readers
                    # and goes with the next cleanup_tmp.
                    logger.warning("left %s behind: %s", self.uri(tmp_key), exc)
            else:
                fs.move(tmp_path, final_path)
                fs.delete_dir(self.path(tmp_dir))
        return sha256_hex(data)

    def write_json_atomic(self, key: str, payload: Any) -> str:
        return self.write_bytes_atomic(key, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def write_parquet_atomic(self, key: str, table: pa.Table) -> str:
        """Serialise ``table`` as Parquet (:func:`parquet_bytes`) and commit it atomically. Returns its sha256."""
        return self.write_bytes_atomic(key, parquet_bytes(table))

    def delete(self, key: str) -> None:
        if self.exists(key):
            with self._naming(key, "delete"):
                self.filesystem.delete_file(self.path(key))

    def cleanup_tmp(self) -> int:
        """Remove leftovers of interrupted writes, S3 directory markers included.

        Only safe while no writer is active on this root. Returns how many temporary files went.
        """
        tmp = self.path(TMP_PREFIX)
        with self._naming(TMP_PREFIX, "clean up"):
            if self.is_s3:
                return self._cleanup_s3_prefix(tmp + "/")
            infos = self.filesystem.get_file_info(pafs.FileSelector(tmp, recursive=True, allow_not_found=True))
            if infos:
                self.filesystem.delete_dir(tmp)
        return sum(1 for info in infos if info.is_file)

    # -- S3 through boto3, where pyarrow would leave directory markers ---------------------------
    def _s3_client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            settings = self.s3
            self._client = boto3.client(
                "s3",
                endpoint_url=settings.resolved_endpoint(),
                region_name=settings.resolved_region(),
                config=Config(
                    retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                    connect_timeout=settings.connect_timeout_s,
                    read_timeout=settings.request_timeout_s,
                ),
            )
        return self._client

    def _delete_s3_objects(self, paths: list[str]) -> None:
        """Delete ``bucket/key`` paths (markers ``bucket/key/`` too) without creating parent markers."""
        by_bucket: dict[str, list[str]] = {}
        for path in paths:
            bucket, _, key = path.partition("/")
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                chunk = [{"Key": key} for key in keys[start : start + 1000]]
                reply = self._s3_client().delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
                if reply.get("Errors"):
                    first = reply["Errors"][0]
                    raise StorageError(f"could not delete s3://{bucket}/{first['Key']}: {first.get('Message')}")

    def _cleanup_s3_prefix(self, prefix_path: str) -> int:
        bucket, _, prefix = prefix_path.partition("/")
        pages = self._s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        self._delete_s3_objects([f"{bucket}/{key}" for key in keys])
        return sum(1 for key in keys if not key.endswith("/"))

    # -- other readers -------------------------------------------------------------------------
    def polars_storage_options(self) -> dict[str, str] | None:
        """``storage_options`` for polars' object-store reader (None for local paths)."""
        if not self.is_s3:
            return None
        options = {"aws_region": self.s3.resolved_region()}
        endpoint = self.s3.resolved_endpoint()
        if endpoint:
            options["aws_endpoint_url"] = endpoint
            options["aws_allow_http"] = str(endpoint.startswith("http://")).lower()
        for env_name, option in (
            ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
            ("AWS_SESSION_TOKEN", "aws_session_token"),
        ):
            if os.environ.get(env_name):
                options[option] = os.environ[env_name]
        return options


def read_uri_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    """Read one object given by a full URI (local path, file:// or s3://)."""
    fs, path = resolve_filesystem(uri, s3)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def list_uri(prefix_uri: str, s3: S3Settings | None = None) -> list[str]:
    """All file URIs under a folder or S3 prefix (recursive), sorted."""
    fs, base = resolve_filesystem(prefix_uri, s3)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=False)
    paths = sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)
    if is_s3_uri(prefix_uri):
        return [f"s3://{p}" for p in paths]
    return paths


def uri_is_dir(uri: str, s3: S3Settings | None = None) -> bool:
    fs, path = resolve_filesystem(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.Directory

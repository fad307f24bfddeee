"""The one storage seam: a run root (or any source URI) on local disk or ``s3://bucket/prefix``.

Everything above this module talks in *keys* relative to a root (``crawl/part-0001.parquet``);
only this module knows whether a key lives on a local disk or in an S3 bucket. Both are served by
``pyarrow.fs`` so the same code path (and the same atomic-commit discipline) covers both:

* data is first written to ``_tmp/<uuid>/<key>`` and then moved to its final key, so a reader never
  sees a half-written object under a final key (local: ``rename``; S3: server-side copy, then delete);
* S3 credentials come from the environment or the instance role, never from config files; the
  endpoint may be overridden for S3-compatible servers (SeaweedFS, MinIO, moto) via config or
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
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


def resolve_filesystem(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a local path, ``file://`` URI or ``s3://`` URI to a pyarrow filesystem and a path in it."""
    if is_s3_uri(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"S3 URI {uri!r} has no bucket")
        path = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        return _s3_filesystem(s3 or S3Settings()), path
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    if "://" in uri:
        raise ValueError(f"unsupported storage URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Storage:
    """Keys under one root URI, with atomic writes. Picklable: it rebuilds its filesystem lazily."""

    def __init__(self, root_uri: str, s3: S3Settings | None = None) -> None:
        self.root_uri = root_uri.rstrip("/") if root_uri not in ("/", "") else root_uri
        self.s3 = s3 or S3Settings()
        self._fs: pafs.FileSystem | None = None
        self._base: str | None = None

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
        return self.filesystem.get_file_info(self.path(key)).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        with self.filesystem.open_input_stream(self.path(key)) as stream:
            return stream.read()

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_parquet(self, key: str, columns: list[str] | None = None) -> pa.Table:
        with self.filesystem.open_input_file(self.path(key)) as handle:
            return pq.read_table(handle, columns=columns)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All files under ``prefix`` (recursive), as keys relative to the root, sorted."""
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        base = self.base_path.rstrip("/") + "/"
        found = [
            ObjectInfo(info.path.removeprefix(base), info.size or 0)
            for info in self.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File
        ]
        return sorted((obj for obj in found if not obj.key.startswith(TMP_PREFIX + "/")), key=lambda o: o.key)

    # -- writes --------------------------------------------------------------------------------
    def write_bytes_atomic(self, key: str, data: bytes | memoryview) -> str:
        """Write ``data`` to a temporary key, then move it to ``key``. Returns its sha256."""
        tmp_dir = f"{TMP_PREFIX}/{uuid.uuid4().hex}"
        tmp_key = f"{tmp_dir}/{key}"
        fs = self.filesystem
        final_path, tmp_path = self.path(key), self.path(tmp_key)
        if not self.is_s3:
            fs.create_dir(os.path.dirname(tmp_path), recursive=True)
            fs.create_dir(os.path.dirname(final_path), recursive=True)
        with fs.open_output_stream(tmp_path) as out:
            out.write(data)
        fs.move(tmp_path, final_path)
        if not self.is_s3:
            fs.delete_dir(self.path(tmp_dir))
        return sha256_hex(data)

    def write_json_atomic(self, key: str, payload: Any) -> str:
        return self.write_bytes_atomic(key, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def write_parquet_atomic(self, key: str, table: pa.Table) -> str:
        """Serialise ``table`` as Parquet and commit it atomically. Returns its sha256.

        Columns are zstd-compressed except binary ones (image bytes, JPEG crops): those are already
        compressed, and zstd would cost CPU (about 3 ms per 4K JPEG) for nothing.
        """
        compression = {
            field.name: "none" if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type) else "zstd"
            for field in table.schema
        }
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression or "zstd", row_group_size=64)
        return self.write_bytes_atomic(key, memoryview(sink.getvalue()))

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.filesystem.delete_file(self.path(key))

    def cleanup_tmp(self) -> int:
        """Remove leftovers of interrupted writes. Returns how many temporary objects went."""
        selector = pafs.FileSelector(self.path(TMP_PREFIX), recursive=True, allow_not_found=True)
        leftovers = [i.path for i in self.filesystem.get_file_info(selector) if i.type == pafs.FileType.File]
        for path in leftovers:
            self.filesystem.delete_file(path)
        return len(leftovers)

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

"""Where a captioner's weights come from: a local folder, an S3 prefix (synced to a local cache) or a hub id."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pyarrow.fs as pafs

from ps3_engine.infra.storage import S3Settings, is_s3_uri, read_uri_bytes, resolve_filesystem
from ps3_engine.stages.captioning.backends import CaptionBackendUnavailable

logger = logging.getLogger(__name__)


def resolve_model_dir(model: str, cache_dir: str, s3: S3Settings | None = None) -> str:
    """A path or hub id that ``from_pretrained`` / vLLM can open.

    ``s3://bucket/prefix`` is copied once into ``cache_dir`` (files already there with the same size are
    kept). A string that looks like a path (starts with ``/``, ``.`` or ``~``) must exist. Anything else
    is a Hugging Face hub id, resolved by the model library from its cache.
    """
    if is_s3_uri(model):
        return _sync_s3_prefix(model, Path(cache_dir).expanduser(), s3)
    if model.startswith(("/", ".", "~")):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise CaptionBackendUnavailable(f"captioner model folder {model!r} has no config.json")
        return str(path)
    return model


def _sync_s3_prefix(uri: str, cache_root: Path, s3: S3Settings | None) -> str:
    """Copy the objects under ``uri`` into a cache folder.

    A cached file is reused only when its size and modification time equal the object's (the copy is
    stamped with the object's mtime), so weights replaced under the same prefix are fetched again.
    """
    local = cache_root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    prefix = uri.rstrip("/")
    fs, base = resolve_filesystem(prefix, s3)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=False))
    except FileNotFoundError:
        infos = []
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise CaptionBackendUnavailable(f"no model files under {uri}")
    for info in files:
        target = local / info.path[len(base.rstrip("/")) + 1 :]
        remote_mtime = info.mtime.timestamp() if info.mtime else None
        same_size = target.exists() and target.stat().st_size == info.size
        if same_size and (remote_mtime is None or abs(target.stat().st_mtime - remote_mtime) < 1.0):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(read_uri_bytes(f"s3://{info.path}", s3))
        if remote_mtime is not None:
            os.utime(partial, (remote_mtime, remote_mtime))
        partial.replace(target)
    logger.info("captioner weights %s synced to %s", uri, local)
    return str(local)

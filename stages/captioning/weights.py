"""Where a captioner's weights come from: a local folder, an S3 prefix (synced to a local cache) or a hub id."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from infra.storage import S3Settings, is_s3_uri, list_uri, read_uri_bytes
from stages.captioning.backends import CaptionBackendUnavailable

logger = logging.getLogger(__name__)


def resolve_model_dir(model: str, cache_dir: str, s3: S3Settings | None = None) -> str:
    """A path or hub id that ``from_pretrained`` / vLLM can open.

    ``s3://bucket/prefix`` is copied once into ``cache_dir`` (files already there with the same size are
    kept). A string that looks like a path (starts with ``/``, ``.`` or ``~``) must exist. Anything else
    is a Hugging Face hub id, resolved by the model library from its cache.
    """
    if is_s3_uri(model):
        local = Path(cache_dir).expanduser() / hashlib.sha256(model.encode()).hexdigest()[:16]
        prefix = model.rstrip("/")
        files = list_uri(prefix, s3)
        if not files:
            raise CaptionBackendUnavailable(f"no model files under {model}")
        for uri in files:
            target = local / uri[len(prefix) + 1 :]
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(read_uri_bytes(uri, s3))
            partial.replace(target)
        logger.info("captioner weights %s synced to %s", model, local)
        return str(local)
    if model.startswith(("/", ".", "~")):
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise CaptionBackendUnavailable(f"captioner model folder {model!r} has no config.json")
        return str(path)
    return model

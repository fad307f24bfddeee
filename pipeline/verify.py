"""Integrity of a run's committed files (``ps3-engine status --check``, before the conservation check).

A rerun checks only that each committed file exists with the size its manifest recorded (one metadata
request per file, :meth:`RunLayout.damage`). This module does the full check: every manifest parses,
every file it names hashes to the recorded sha256 and opens as Parquet, every planned crawl input and
the dedup and dataset files open. Each problem names the file, so a user can see what a rerun will
recompute.
"""

from __future__ import annotations

import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from ps3_engine.infra.storage import StorageError, sha256_hex
from ps3_engine.pipeline.conservation import Gap
from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.schemas import ManifestEntry

logger = logging.getLogger(__name__)

# <stage>/_manifest/<shard>.json: the per-shard completion records of every stage, whatever its name.
_MANIFEST_KEY = re.compile(r"(?P<stage>[^/]+)/_manifest/(?P<shard>[^/]+)\.json")


def _damaged(stage: str, shard: str, why: str) -> Gap:
    return Gap(stage, shard, "damaged", 1, (why,))


def _parquet_problem(data: bytes) -> str | None:
    try:
        pq.read_metadata(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        return f"not readable as Parquet ({exc})"
    return None


def _check_file(layout: RunLayout, key: str, checksum: str, size: int | None) -> str | None:
    """Why ``key`` is not the file its manifest recorded (None when it is)."""
    uri = layout.storage.uri(key)
    if not layout.storage.exists(key):
        return f"{uri} is missing"
    data = layout.storage.read_bytes(key)
    if size is not None and len(data) != size:
        return f"{uri} is {len(data)} bytes but its manifest recorded {size}"
    if sha256_hex(data) != checksum:
        return f"{uri} does not match the sha256 its manifest recorded"
    problem = _parquet_problem(data)
    return f"{uri} is {problem}" if problem else None


def verify_shard(layout: RunLayout, stage: str, shard: str, manifest_key: str) -> list[Gap]:
    data = layout.storage.read_bytes(manifest_key)
    try:
        entry = ManifestEntry.model_validate_json(data)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        why = f"{layout.storage.uri(manifest_key)} is not a valid manifest ({len(data)} bytes: {problem})"
        return [_damaged(stage, shard, why)]
    gaps = []
    for key, checksum, size in (
        (entry.output_key, entry.output_checksum, entry.output_bytes),
        (entry.errors_key, entry.errors_checksum, entry.errors_bytes),
    ):
        problem = _check_file(layout, key, checksum, size)
        if problem:
            gaps.append(_damaged(stage, shard, problem))
    return gaps


def _verify_dataset(layout: RunLayout) -> list[Gap]:
    """The packed dataset's shards against the sha256 its manifest recorded for each."""
    if not layout.storage.exists(DATASET_MANIFEST_KEY):
        return []
    try:
        manifest = layout.storage.read_json(DATASET_MANIFEST_KEY)
    except StorageError as exc:
        return [_damaged("dataset", "-", str(exc))]
    gaps = []
    for shard in manifest.get("shards", []):
        for key, checksum in ((shard["key"], shard["sha256"]), (shard["pairs_key"], shard["pairs_sha256"])):
            problem = _check_file(layout, key, checksum, None)
            if problem:
                gaps.append(_damaged("dataset", key, problem))
    return gaps


def verify_run(layout: RunLayout) -> list[Gap]:
    """Every integrity problem of the run's committed files, each naming its file (empty when sound).

    Reads every committed file once (full checksums): the cost of a copy of the run.
    """
    gaps: list[Gap] = []
    objects = layout.storage.list()
    for obj in objects:
        match = _MANIFEST_KEY.fullmatch(obj.key)
        if match:
            gaps += verify_shard(layout, match["stage"], match["shard"], obj.key)
    singles = [o.key for o in objects if o.key.startswith("crawl/_input/") and o.key.endswith(".parquet")]
    singles += [key for key in (RunLayout.DEDUP_KEY,) if layout.storage.exists(key)]
    for key in singles:
        problem = _parquet_problem(layout.storage.read_bytes(key))
        if problem:
            gaps.append(_damaged(key.split("/", 1)[0], key, f"{layout.storage.uri(key)} is {problem}"))
    for key in (RunLayout.DEDUP_MANIFEST_KEY, RunLayout.RUN_CONFIG_KEY):
        if layout.storage.exists(key):
            try:
                layout.storage.read_json(key)
            except StorageError as exc:
                gaps.append(_damaged(key.split("/", 1)[0], key, str(exc)))
    gaps += _verify_dataset(layout)
    logger.info("verified %d committed objects: %d problems", len(objects), len(gaps))
    return gaps

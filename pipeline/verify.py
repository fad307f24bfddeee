"""Integrity of a run's committed files (``ps3-engine status --check``, before the conservation check).

A rerun checks only that each committed file exists with the size its manifest recorded (one metadata
listing of the stage's files, :meth:`RunLayout.damage`). This module does the full check: every manifest parses,
every file it names hashes to the recorded sha256 and opens as Parquet, every planned crawl input and
the dedup and dataset files open. Each problem names the file, so a user can see what a rerun will
recompute.

The per-shard checks (every manifest and its two files, every crawl input) run in batches of
:data:`BATCH_KEYS` objects: as Ray tasks when the run's executor is Ray and there is more than one batch
(a 75M-image run is over a million files to hash), on a thread pool in this process otherwise. The
problems found are the same either way, in the same order.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from ps3_engine.infra.storage import Storage, StorageError, sha256_hex
from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.gaps import Gap
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.shard_index import parallel_map
from ps3_engine.schemas import ManifestEntry

logger = logging.getLogger(__name__)

# <stage>/_manifest/<shard>.json: the per-shard completion records of every stage, whatever its name.
_MANIFEST_KEY = re.compile(r"(?P<stage>[^/]+)/_manifest/(?P<shard>[^/]+)\.json")
BATCH_KEYS = 256


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


def _verify_key(layout: RunLayout, key: str) -> list[Gap]:
    """Problems of one manifest (and the files it names) or of one Parquet file that must open."""
    match = _MANIFEST_KEY.fullmatch(key)
    if match:
        return verify_shard(layout, match["stage"], match["shard"], key)
    problem = _parquet_problem(layout.storage.read_bytes(key))
    return [_damaged(key.split("/", 1)[0], key, f"{layout.storage.uri(key)} is {problem}")] if problem else []


def verify_keys(storage: Storage, keys: list[str]) -> list[Gap]:
    """:func:`_verify_key` over a batch of keys, in order (the body of one Ray task)."""
    layout = RunLayout(storage)
    return [gap for key in keys for gap in _verify_key(layout, key)]


def _ray_settings(layout: RunLayout) -> tuple[bool, str | None]:
    """Whether the run's executor is Ray, and its cluster address (from ``run.json``)."""
    try:
        executor: dict[str, Any] = layout.storage.read_json(RunLayout.RUN_CONFIG_KEY)["config"].get("executor", {})
    except (FileNotFoundError, StorageError, KeyError):
        return False, None
    return executor.get("kind") == "ray", executor.get("ray_address")


def _verify_batches(layout: RunLayout, batches: list[list[str]], use_ray: bool | None) -> list[Gap]:
    on_ray, address = _ray_settings(layout)
    if use_ray is None:
        use_ray = on_ray and len(batches) > 1
    if not use_ray:
        return [gap for found in parallel_map(lambda keys: verify_keys(layout.storage, keys), batches) for gap in found]
    import ray

    from ps3_engine.pipeline.executor import ensure_ray

    ensure_ray(address)
    task = ray.remote(num_cpus=1)(verify_keys)
    logger.info("verifying %d batches of up to %d objects as Ray tasks", len(batches), BATCH_KEYS)
    return [gap for found in ray.get([task.remote(layout.storage, keys) for keys in batches]) for gap in found]


def verify_run(layout: RunLayout, use_ray: bool | None = None) -> list[Gap]:
    """Every integrity problem of the run's committed files, each naming its file (empty when sound).

    Reads every committed file once (full checksums): the cost of a copy of the run. ``use_ray``:
    None runs the per-shard checks on Ray when the run's executor is Ray and they fill several batches.
    """
    objects = layout.storage.list()
    keys = [o.key for o in objects if _MANIFEST_KEY.fullmatch(o.key)]
    keys += [o.key for o in objects if o.key.startswith("crawl/_input/") and o.key.endswith(".parquet")]
    keys += [key for key in (RunLayout.DEDUP_KEY,) if layout.storage.exists(key)]
    batches = [keys[start : start + BATCH_KEYS] for start in range(0, len(keys), BATCH_KEYS)]
    gaps = _verify_batches(layout, batches, use_ray)
    for key in (RunLayout.DEDUP_MANIFEST_KEY, RunLayout.RUN_CONFIG_KEY):
        if layout.storage.exists(key):
            try:
                layout.storage.read_json(key)
            except StorageError as exc:
                gaps.append(_damaged(key.split("/", 1)[0], key, str(exc)))
    gaps += _verify_dataset(layout)
    logger.info("verified %d committed objects: %d problems", len(objects), len(gaps))
    return gaps

"""VILA-HD SFT datasets on storage (local or S3): Parquet shards of ``SFT_SCHEMA`` rows plus a manifest.

Layout under a root: ``vila_hd_sft/<split>-NNNNN.parquet`` and ``vila_hd_sft/manifest.json`` (written
last; it lists every shard with its split, row count and kinds). The trainer also takes a packed corpus
(``dataset/manifest.json``) and makes grounded samples from it on the fly (``training_rows``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.schemas.corpus import MANIFEST_KEY as CORPUS_MANIFEST_KEY
from ps3_engine.training.ps3.data import CorpusCheck, check_corpus, read_corpus
from ps3_engine.training.vila_hd.data import SFT_SCHEMA, SFT_SCHEMA_VERSION, GroundedSampleMaker, VilaHDSample

if TYPE_CHECKING:
    import ray.data

SFT_PREFIX = "vila_hd_sft"
SFT_MANIFEST_KEY = f"{SFT_PREFIX}/manifest.json"


def write_sft_dataset(
    out_uri: str, splits: dict[str, Iterable[VilaHDSample]], rows_per_shard: int = 512, s3: S3Settings | None = None
) -> dict[str, Any]:
    """Write samples as ``SFT_SCHEMA`` Parquet shards plus a manifest (written last). Returns the manifest."""
    storage = Storage(out_uri, s3)
    shards: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for split, samples in splits.items():
        buffer: list[VilaHDSample] = []
        for sample in [*samples, None]:
            if sample is not None:
                buffer.append(sample)
            if buffer and (sample is None or len(buffer) >= rows_per_shard):
                key = f"{SFT_PREFIX}/{split}-{sum(s['split'] == split for s in shards):05d}.parquet"
                storage.write_parquet_atomic(key, pa.Table.from_pylist([s.to_row() for s in buffer], SFT_SCHEMA))
                kinds = {k: sum(s.kind == k for s in buffer) for k in {s.kind for s in buffer}}
                shards.append({"key": key, "split": split, "rows": len(buffer), "kinds": kinds})
                for kind, n in kinds.items():
                    counts.setdefault(split, {}).setdefault(kind, 0)
                    counts[split][kind] += n
                buffer = []
    manifest = {
        "record_kind": "vila_hd_sample",
        "schema_version": SFT_SCHEMA_VERSION,
        "counts": counts,
        "shards": shards,
    }
    storage.write_json_atomic(SFT_MANIFEST_KEY, manifest)
    return manifest


def check_sft_dataset(uri: str, s3: S3Settings | None = None) -> CorpusCheck:
    """Validate an SFT dataset from its manifest and Parquet footers only; never raises."""
    check = CorpusCheck(uri)
    try:
        storage = Storage(uri, s3)
        if not storage.exists(SFT_MANIFEST_KEY):
            check.problems.append(f"no {SFT_MANIFEST_KEY} under {uri}")
            return check
        manifest = storage.read_json(SFT_MANIFEST_KEY)
        check.counts = manifest.get("counts", {})
        if manifest.get("record_kind") != "vila_hd_sample":
            check.problems.append(f"record_kind is {manifest.get('record_kind')!r}, not 'vila_hd_sample'")
        if manifest.get("schema_version") != SFT_SCHEMA_VERSION:
            check.problems.append(f"schema_version is {manifest.get('schema_version')!r}, not {SFT_SCHEMA_VERSION}")
        if not any(s.get("split") == "train" and s.get("rows") for s in manifest.get("shards", [])):
            check.problems.append("the manifest lists no train rows")
        for shard in manifest.get("shards", []):
            if not storage.exists(shard["key"]):
                check.problems.append(f"shard {shard['key']} is missing")
                continue
            metadata = pq.read_metadata(storage.path(shard["key"]), filesystem=storage.filesystem)
            if not metadata.schema.to_arrow_schema().remove_metadata().equals(SFT_SCHEMA.remove_metadata()):
                check.problems.append(f"shard {shard['key']} does not have SFT_SCHEMA")
            if metadata.num_rows != shard.get("rows"):
                check.problems.append(f"shard {shard['key']}: {metadata.num_rows} rows, manifest {shard.get('rows')}")
    except Exception as error:  # the check reports, it does not raise
        check.problems.append(f"could not check the dataset: {type(error).__name__}: {error}")
    return check


def check_training_data(uri: str, s3: S3Settings | None = None) -> tuple[str, CorpusCheck]:
    """``("sft", check)`` for an SFT dataset, ``("corpus", check)`` for a packed corpus; never raises."""
    try:
        storage = Storage(uri, s3)
        if storage.exists(SFT_MANIFEST_KEY):
            return "sft", check_sft_dataset(uri, s3)
        if storage.exists(CORPUS_MANIFEST_KEY):
            return "corpus", check_corpus(uri, s3)
    except Exception as error:
        return "unknown", CorpusCheck(uri, problems=[f"cannot read {uri}: {type(error).__name__}: {error}"])
    return "unknown", CorpusCheck(uri, problems=[f"{uri} has neither {SFT_MANIFEST_KEY} nor {CORPUS_MANIFEST_KEY}"])


def training_rows(
    uri: str, kind: str, split: str, maker: GroundedSampleMaker | None = None, s3: S3Settings | None = None
) -> ray.data.Dataset:
    """Rows in ``SFT_SCHEMA`` form as a Ray Dataset: the SFT shards, or corpus rows made into grounded samples.

    Raises:
        ValueError: no shard for ``split`` or an unknown kind.
    """
    import ray.data

    if kind == "corpus":
        return read_corpus(uri, split, s3).flat_map((maker or GroundedSampleMaker()).rows)
    if kind != "sft":
        raise ValueError(f"unknown training data kind {kind!r}")
    storage = Storage(uri, s3)
    keys = [s["key"] for s in storage.read_json(SFT_MANIFEST_KEY).get("shards", []) if s.get("split") == split]
    if not keys:
        raise ValueError(f"SFT dataset {uri} has no {split!r} shards")
    return ray.data.read_parquet([storage.path(k) for k in keys], filesystem=storage.filesystem, schema=SFT_SCHEMA)

"""Corpus build: per-shard corpus rows -> size-targeted, split Parquet shards, a flat pairs view, a manifest.

```
dataset/images/train/shard-<build>-00000.parquet       one image per row: CORPUS_SCHEMA + the input's extra
dataset/images/validation/shard-<build>-00000.parquet  columns (typed, see pipeline/provenance.py)
dataset/pairs/train/shard-<build>-00000.parquet        PAIRS_SCHEMA: one (box, caption) per row, pointing at its image
dataset/pairs/validation/...
dataset/manifest.json                                  counts, sources, fingerprints, schemas, shard list; last
dataset/README.md                                      HF dataset card: configs images, pairs (this build's files)
```
Each table has its own root with one schema under it, so ``dataset/images`` (or ``dataset/pairs``) loads
as a folder in polars, pyarrow.dataset, DuckDB, HF ``datasets`` (split names from the folder names) and
Ray Data; the manifest sits beside the table roots, not among the Parquet files.

A rebuild writes a new build's files next to the old ones, switches ``manifest.json``, then deletes the
old build's files. Readers that go through the manifest never see a mix; a plain glob of the split
folders can see both builds while a rebuild is running (or after one crashed, until the rerun).
The pack is planned in the driver from row counts and file sizes only, then each output shard is
written by its own worker (Ray tasks on a Ray executor). A rebuild happens only when the per-shard
corpus rows or the pack settings changed (the manifest's input fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.progress import ItemProgress
from ps3_engine.pipeline.provenance import extra_columns_arrays, extra_columns_schema, schema_description
from ps3_engine.schemas import CORPUS_SCHEMA
from ps3_engine.schemas.corpus import (
    BOX_CONVENTION,
    CORPUS_REGION_TYPE,
    DATASET_PREFIX,
    INPUT_COLUMNS_FIELD,
    MANIFEST_KEY,
)
from ps3_engine.schemas.corpus import SCHEMA_VERSION as CORPUS_SCHEMA_VERSION
from ps3_engine.stages.corpus import CorpusConfig

logger = logging.getLogger(__name__)

IMAGES_PREFIX = f"{DATASET_PREFIX}/images"
CARD_KEY = f"{DATASET_PREFIX}/README.md"
PAIRS_PREFIX = f"{DATASET_PREFIX}/pairs"
SPLITS = ("train", "validation")

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("corpus_shard", pa.string(), nullable=False),
        pa.field("row_index", pa.int32(), nullable=False),
        *CORPUS_REGION_TYPE,  # region_id, x0, y0, x1, y1 (box convention in their metadata), caption
        pa.field("global_caption", pa.string()),
        CORPUS_SCHEMA.field("width"),
        CORPUS_SCHEMA.field("height"),
        CORPUS_SCHEMA.field("url"),
        CORPUS_SCHEMA.field("source_list"),
    ],
    metadata={
        "record_kind": "corpus_pair",
        "schema_version": str(CORPUS_SCHEMA_VERSION),
        "box_convention": BOX_CONVENTION,
    },
)
_PAIR_IMAGE_COLUMNS = ["image_id", "split", "regions", "global_caption", "width", "height", "url", "source_list"]


def dataset_schema(extra: pa.Schema) -> pa.Schema:
    """The packed images table's schema: ``CORPUS_SCHEMA``'s columns, then the input's extra columns."""
    metadata = {**CORPUS_SCHEMA.metadata, b"extra_columns": json.dumps(extra.names).encode()}
    return pa.schema([*CORPUS_SCHEMA, *extra], metadata=metadata)


@dataclass(frozen=True)
class RowSlice:
    input_key: str
    indices: tuple[int, ...]  # row positions in the input shard


@dataclass
class OutputShard:
    """One packed shard. Its file names carry the build id (the first characters of the input
    fingerprint), so a rebuild never overwrites a file the current manifest lists: readers going through
    the manifest see either the old build or the new one, never a mix, even if a rebuild crashes."""

    split: str
    index: int
    slices: list[RowSlice] = field(default_factory=list)
    estimated_bytes: float = 0.0
    build: str = ""
    extra: pa.Schema = field(default_factory=lambda: pa.schema([]))  # the input's extra columns

    @property
    def key(self) -> str:
        return f"{IMAGES_PREFIX}/{self.split}/shard-{self.build}-{self.index:05d}.parquet"

    @property
    def pairs_key(self) -> str:
        return f"{PAIRS_PREFIX}/{self.split}/shard-{self.build}-{self.index:05d}.parquet"


@dataclass
class CorpusResult:
    rebuilt: bool
    manifest: dict[str, Any]

    @property
    def counts(self) -> dict[str, Any]:
        return self.manifest["counts"]


def input_fingerprint(layout: RunLayout, config: CorpusConfig, fingerprints: dict[str, str]) -> str:
    """Changes when the corpus rows, the pack settings or any stage's config changed.

    The stage fingerprints are part of it so the manifest never describes an older config, even when a
    config change happened to produce identical rows.
    """
    entries = layout.manifests("corpus")
    payload = {
        "shards": sorted((shard, e.output_checksum) for shard, e in entries.items()),
        "config": config.model_dump(mode="json", exclude={"batch_size", "max_workers"}),
        "stage_fingerprints": fingerprints,
        "schema_version": CORPUS_SCHEMA_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def plan_pack(
    layout: RunLayout, target_bytes: int, build: str = "", source_lists: set[str] | None = None
) -> list[OutputShard]:
    """Assign input rows to output shards per split, in input order, by estimated bytes per row.

    ``source_lists``, when given, collects the input lists the rows came from (for the extra columns).
    """
    sizes = {obj.key: obj.size for obj in layout.storage.list("corpus/")}
    current: dict[str, OutputShard] = {}
    finished: list[OutputShard] = []
    for shard_id, entry in sorted(layout.manifests("corpus").items()):
        if entry.output_rows == 0:
            continue
        bytes_per_row = sizes.get(entry.output_key, 0) / entry.output_rows
        columns = layout.storage.read_parquet(entry.output_key, columns=["split", "source_list"])
        if source_lists is not None:
            source_lists.update(pc.unique(columns.column("source_list")).to_pylist())
        splits = columns.column("split").to_pylist()
        for split in SPLITS:
            indices = [i for i, s in enumerate(splits) if s == split]
            start = 0
            while start < len(indices):
                shard = current.get(split)
                if shard is None:
                    index = sum(1 for s in finished if s.split == split)
                    shard = current[split] = OutputShard(split, index, build=build)
                room = max(1, int((target_bytes - shard.estimated_bytes) // max(bytes_per_row, 1.0)))
                take = indices[start : start + room]
                shard.slices.append(RowSlice(entry.output_key, tuple(take)))
                shard.estimated_bytes += len(take) * bytes_per_row
                start += len(take)
                if shard.estimated_bytes >= target_bytes:
                    finished.append(shard)
                    del current[split]
        logger.debug("planned corpus shard input %s", shard_id)
    finished.extend(current.values())
    return sorted(finished, key=lambda s: (s.split, s.index))


def pairs_view(table: pa.Table, corpus_shard: str) -> pa.Table:
    rows = []
    for index, row in enumerate(table.select(_PAIR_IMAGE_COLUMNS).to_pylist()):
        for region in row.pop("regions"):
            rows.append({**row, "corpus_shard": corpus_shard, "row_index": index, **region})
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def _packed_rows(part: pa.Table, extra: pa.Schema) -> pa.Table:
    """Per-shard corpus rows -> the dataset's columns: base columns cast, extra columns typed from JSON."""
    base = part.select(CORPUS_SCHEMA.names).cast(CORPUS_SCHEMA)
    if INPUT_COLUMNS_FIELD in part.column_names:
        texts = part.column(INPUT_COLUMNS_FIELD).to_pylist()
    else:  # rows written before the input columns were carried
        texts = [None] * part.num_rows
    arrays = [*base.columns, *(pa.chunked_array([a]) for a in extra_columns_arrays(texts, extra))]
    return pa.Table.from_arrays(arrays, schema=dataset_schema(extra))


def write_output_shard(storage: Storage, shard: OutputShard) -> dict[str, Any]:
    """Gather the shard's rows from the per-shard corpus files and commit the shard and its pairs view."""
    parts = []
    for piece in shard.slices:
        table = storage.read_parquet(piece.input_key)
        parts.append(_packed_rows(table.take(pa.array(piece.indices, pa.int64())), shard.extra))
    table = pa.concat_tables(parts)
    checksum = storage.write_parquet_atomic(shard.key, table)
    pairs = pairs_view(table, shard.key)
    pairs_checksum = storage.write_parquet_atomic(shard.pairs_key, pairs)
    return {
        "key": shard.key,
        "split": shard.split,
        "rows": table.num_rows,
        "regions": pairs.num_rows,
        "global_captions": table.num_rows - table.column("global_caption").null_count,
        "sources": dict(zip(*_value_counts(table.column("source_list")), strict=True)),
        "sha256": checksum,
        "bytes": _size(storage, shard.key),
        "pairs_key": shard.pairs_key,
        "pairs_sha256": pairs_checksum,
        "pairs_bytes": _size(storage, shard.pairs_key),
    }


def _size(storage: Storage, key: str) -> int:
    info = storage.info(key)
    return info.size if info is not None else -1


def damaged_dataset_files(storage: Storage, manifest: dict[str, Any]) -> list[str]:
    """URIs of the packed files ``manifest`` lists that are missing or not the size it recorded.

    One metadata request per file (checksums are ``status --check``'s job). Manifests written before
    sizes were recorded are checked for presence only.
    """
    damaged = []
    for shard in manifest.get("shards", []):
        for key_field, size_field in (("key", "bytes"), ("pairs_key", "pairs_bytes")):
            info = storage.info(shard[key_field])
            recorded = shard.get(size_field)
            if info is None or (recorded is not None and info.size != recorded):
                damaged.append(storage.uri(shard[key_field]))
    return damaged


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(column)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def build_corpus(
    layout: RunLayout,
    config: CorpusConfig,
    fingerprints: dict[str, str],
    use_ray: bool = False,
    progress: bool = True,
) -> CorpusResult:
    """Pack the per-shard corpus rows into the final dataset; a no-op when nothing changed."""
    fingerprint = input_fingerprint(layout, config, fingerprints)
    storage = layout.storage
    if storage.exists(MANIFEST_KEY):
        previous = storage.read_json(MANIFEST_KEY)
        damaged = damaged_dataset_files(storage, previous)
        if previous.get("input_fingerprint") == fingerprint and not damaged:
            logger.info("corpus: dataset is up to date (%s)", fingerprint)
            return CorpusResult(False, previous)
        if damaged:
            # A committed file cut short or rewritten outside the engine: the whole pack is rebuilt.
            logger.warning("corpus: %d dataset files are damaged (%s); packing again", len(damaged), damaged[0])
    source_lists: set[str] = set()
    plan = plan_pack(layout, config.target_shard_bytes, build=fingerprint[:8], source_lists=source_lists)
    extra = extra_columns_schema(source_lists, storage.s3)
    for shard in plan:
        shard.extra = extra
    logger.info("corpus: packing into %d shards (%d extra input columns)", len(plan), len(extra))
    if use_ray and plan:
        import ray

        write = ray.remote(num_cpus=1)(write_output_shard)
        pending = [write.remote(storage, shard) for shard in plan]
        results = (ray.get(ref) for ref in pending)
    else:
        results = (write_output_shard(storage, shard) for shard in plan)
    # Counted in images like the stages (not in packed shards), plain lines without a terminal.
    bar = ItemProgress("pack", len(plan), progress)
    sizes = [sum(len(piece.indices) for piece in shard.slices) for shard in plan]
    for size in sizes:
        bar.on_batch("input", size, 0, 0)
    written = []
    for size, result in zip(sizes, results, strict=True):
        written.append(result)
        bar.on_batch("process", size, size, 0)
    bar.close()
    manifest = _manifest(written, fingerprint, fingerprints, config, extra)
    # The manifest switches readers to the new build; only then do the old build's files go.
    storage.write_json_atomic(MANIFEST_KEY, manifest)
    storage.write_bytes_atomic(CARD_KEY, dataset_card(written).encode())
    keep = {s["key"] for s in written} | {s["pairs_key"] for s in written}
    for obj in storage.list(DATASET_PREFIX + "/"):
        if obj.key.endswith(".parquet") and obj.key not in keep:
            storage.delete(obj.key)
    return CorpusResult(True, manifest)


def dataset_card(written: list[dict[str, Any]]) -> str:
    """``dataset/README.md``: a Hugging Face dataset card whose ``configs`` name this build's files.

    With it ``datasets.load_dataset("<run>/dataset")`` loads the images table (``name="pairs"``: the pairs),
    split by split, and only the files the manifest lists, even while a rebuild has left others beside them.
    """
    configs = []
    for name, column in (("images", "key"), ("pairs", "pairs_key")):
        files = []
        for split in SPLITS:
            paths = [s[column].removeprefix(DATASET_PREFIX + "/") for s in written if s["split"] == split]
            if paths:
                files.append({"split": split, "path": paths})
        if files:
            configs.append({"config_name": name, "data_files": files, "default": name == "images"})
    front = yaml.safe_dump({"configs": configs}, sort_keys=False) if configs else "{}\n"
    return (
        f"---\n{front}---\n# PS3 region-caption corpus\n\n"
        "Written by ps3-engine build-corpus; see manifest.json and the ps3-engine README, 'Loading the corpus'.\n"
    )


def _manifest(
    written: list[dict[str, Any]],
    fingerprint: str,
    fingerprints: dict[str, str],
    config: CorpusConfig,
    extra: pa.Schema | None = None,
) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    sources: dict[str, int] = {}
    for shard in written:
        split = counts.setdefault(shard["split"], {"images": 0, "regions": 0, "global_captions": 0, "shards": 0})
        split["images"] += shard["rows"]
        split["regions"] += shard["regions"]
        split["global_captions"] += shard["global_captions"]
        split["shards"] += 1
        for source, n in shard["sources"].items():
            sources[source] = sources.get(source, 0) + n
    return {
        "record_kind": "corpus_row",
        "schema_version": CORPUS_SCHEMA_VERSION,
        "input_fingerprint": fingerprint,
        "stage_fingerprints": fingerprints,
        "config": config.model_dump(mode="json"),
        "tables": {"images": IMAGES_PREFIX, "pairs": PAIRS_PREFIX},
        "box_convention": BOX_CONVENTION,
        "extra_columns": schema_description(extra or pa.schema([])),
        "counts": counts,
        "sources": sources,
        "shards": written,
        "written_at": datetime.now(UTC).isoformat(),
    }

"""Export a run's corpus to the two parallel WebDatasets that NVlabs' PS3 training code reads.

``ps3-engine export webdataset RUN OUT`` writes, for one split (default ``train``)::

    OUT/images/image_00000.tar        00000001.jpg, 00000002.jpg, ...   (upright JPEGs, full resolution)
    OUT/text_boxes/text_box_00000.tar 00000001.json, 00000002.json, ... (same keys, same order)
    OUT/images/sizes.json, OUT/text_boxes/sizes.json                    samples per shard (OpenCLIP reads it)
    OUT/export.json                                                     what was written, and the trainer flags

NVlabs/PS3 ``train/src/open_clip_train/data.py`` (``webdataset_separate_image_text_box``) iterates the
two datasets in lockstep and asserts that the keys match, so shard ``k`` of both holds the same images
in the same order. One sample per image. Each JSON holds ``text`` (the local captions), ``box`` (their
boxes, ``[x1, y1, x2, y2]`` in pixels of the image in the tar: the corpus boxes unchanged, since the
image is written upright at full resolution), ``global_text`` (the global caption) and ``type`` (the
corpus ``source_type``: ``natural`` or ``document``; NVlabs' loader passes it through), plus
``image_id``, ``url``, ``width`` and ``height`` for tracing. An image without local pairs has no
``text``/``box`` keys and one without a global caption no ``global_text`` key: NVlabs' loader then
uses what is there (train with ``--use_global_caption`` when some images have only a global caption).

Stored bytes that are already an upright JPEG are copied as they are; other formats (and referenced
files, which keep their EXIF orientation) are decoded, turned upright and encoded as JPEG at quality 95.
An image that cannot be read (e.g. an ``http(s)`` reference: the export reads local and ``s3://`` refs
only) is left out of both datasets and listed in ``export.json`` (``skipped``); its key is not reused.
Keys and shard numbers follow from the manifest's row counts (one key per corpus row, in corpus order),
so the corpus shards are exported in parallel (``workers`` threads in this process).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from ps3_engine.infra.storage import S3Settings, Storage, read_uri_bytes
from ps3_engine.pipeline.corpus import MANIFEST_KEY, SPLITS
from ps3_engine.schemas.corpus import BOX_CONVENTION

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
TEXT_BOXES_DIR = "text_boxes"
EXPORT_MANIFEST = "export.json"
JPEG_QUALITY = 95
_COLUMNS = [
    "image_id",
    "source_type",
    "url",
    "image_bytes",
    "image_ref",
    "exif_orientation",
    "width",
    "height",
    "global_caption",
    "regions",
]


@dataclass
class ExportResult:
    out: str
    split: str
    samples: int
    shards: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def manifest(self) -> dict[str, Any]:
        last = len(self.shards) - 1
        return {
            "format": "NVlabs/PS3 webdataset_separate_image_text_box",
            "split": self.split,
            "samples": self.samples,
            "shards": self.shards,
            "skipped": self.skipped,
            "box_convention": f"box: [x1, y1, x2, y2] = corpus [x0, y0, x1, y1]: {BOX_CONVENTION}",
            "train_data_image": f"{self.out}/{IMAGES_DIR}/image_{{00000..{last:05d}}}.tar",
            "train_data_text_box": f"{self.out}/{TEXT_BOXES_DIR}/text_box_{{00000..{last:05d}}}.tar",
            "written_at": datetime.now(UTC).isoformat(),
        }


def image_key(index: int) -> str:
    """The sample key of the ``index``-th exported image (1-based, as in NVlabs' README): ``00000001``."""
    return f"{index:08d}"


def upright_jpeg(data: bytes, orientation: int) -> bytes:
    """``data`` as an upright JPEG: copied when it already is one, else decoded, transposed, re-encoded.

    Raises:
        OSError / PIL.UnidentifiedImageError: the bytes do not decode as an image.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and orientation == 1 and image.getexif().get(0x0112, 1) == 1:
            return data
        upright = ImageOps.exif_transpose(image).convert("RGB")
    out = io.BytesIO()
    upright.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def text_box_record(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON sample of one corpus row, with NVlabs' field names (see the module docstring)."""
    record: dict[str, Any] = {"type": row["source_type"]}
    if row["regions"]:
        record["text"] = [r["caption"] for r in row["regions"]]
        record["box"] = [[r["x0"], r["y0"], r["x1"], r["y1"]] for r in row["regions"]]
    if row["global_caption"]:
        record["global_text"] = row["global_caption"]
    record.update({k: row[k] for k in ("image_id", "url", "width", "height")})
    return record


class _ShardPair:
    """One image tar and one text-box tar being filled in memory, with identical keys."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.images, self.texts = io.BytesIO(), io.BytesIO()
        # Open across many add() calls and closed in commit(): a with-block cannot span them.
        self._image_tar = tarfile.open(fileobj=self.images, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._text_tar = tarfile.open(fileobj=self.texts, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.keys: list[str] = []
        self.image_bytes = 0

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: reruns write equal bytes
        tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, jpeg: bytes, record: dict[str, Any]) -> None:
        self._add(self._image_tar, f"{key}.jpg", jpeg)
        self._add(self._text_tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
        self.keys.append(key)
        self.image_bytes += len(jpeg)

    def commit(self, storage: Storage) -> dict[str, Any]:
        self._image_tar.close()
        self._text_tar.close()
        image_key_, text_key = self.image_key, self.text_key
        storage.write_bytes_atomic(image_key_, self.images.getbuffer())
        storage.write_bytes_atomic(text_key, self.texts.getbuffer())
        first = self.keys[0] if self.keys else None
        return {"images": image_key_, "text_boxes": text_key, "samples": len(self.keys), "first_key": first}

    @property
    def image_key(self) -> str:
        return f"{IMAGES_DIR}/image_{self.index:05d}.tar"

    @property
    def text_key(self) -> str:
        return f"{TEXT_BOXES_DIR}/text_box_{self.index:05d}.tar"


@dataclass(frozen=True)
class ExportPart:
    """One packed corpus shard and where its samples go: keys from ``first_key``, shards from ``first_shard``.

    Both follow from the manifest's row counts alone, so every part can be written independently (and
    in parallel) and the keys still run in corpus order, one per corpus row.
    """

    corpus_key: str
    rows: int
    first_key: int
    first_shard: int


def plan_export(manifest: dict[str, Any], split: str, samples_per_shard: int) -> list[ExportPart]:
    parts, key, shard = [], 1, 0
    for entry in manifest.get("shards", []):
        if entry.get("split") != split or not entry.get("rows"):
            continue
        parts.append(ExportPart(entry["key"], int(entry["rows"]), key, shard))
        key += int(entry["rows"])
        shard += -(-int(entry["rows"]) // samples_per_shard)
    return parts


def _part_rows(run: Storage, key: str) -> Iterator[dict[str, Any]]:
    with run.filesystem.open_input_file(run.path(key)) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=64, columns=_COLUMNS):
            yield from batch.to_pylist()


def _image_data(row: dict[str, Any], s3: S3Settings) -> bytes:
    if row["image_bytes"] is not None:
        return upright_jpeg(row["image_bytes"], row["exif_orientation"])
    return upright_jpeg(read_uri_bytes(row["image_ref"], s3), row["exif_orientation"])


def write_part(
    run: Storage, target: Storage, part: ExportPart, samples_per_shard: int, s3: S3Settings
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Write one corpus shard's shard pairs; returns (shard entries, skipped images).

    A row that cannot be read leaves a gap in the keys; a shard pair whose rows were all skipped is
    still written (two empty tars), so the shard numbers have no holes for the trainer's brace pattern.
    """
    shards, skipped = [], []
    shard = _ShardPair(part.first_shard)
    for offset, row in enumerate(_part_rows(run, part.corpus_key)):
        index = part.first_shard + offset // samples_per_shard
        if index != shard.index:
            shards.append(shard.commit(target))
            shard = _ShardPair(index)
        try:
            jpeg = _image_data(row, s3)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            logger.warning("export: leaving out image %s: %s", row["image_id"], exc)
            skipped.append({"image_id": row["image_id"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        shard.add(image_key(part.first_key + offset), jpeg, text_box_record(row))
    shards.append(shard.commit(target))
    return shards, skipped


def export_webdataset(
    run_root: str,
    out: str,
    *,
    split: str = "train",
    samples_per_shard: int = 10_000,
    workers: int = 4,
    s3: S3Settings | None = None,
) -> ExportResult:
    """Write ``split`` of the corpus under ``run_root`` as NVlabs/PS3 image + text-box WebDatasets in ``out``.

    ``run_root`` and ``out`` are local paths or ``s3://`` URIs. Each packed corpus shard (about
    ``corpus.target_shard_bytes``) becomes one shard pair, or several of at most ``samples_per_shard``
    images; ``workers`` corpus shards are written at a time (threads: decoding, encoding and I/O release
    the GIL). Old shards in ``out`` beyond the new export's last index are deleted, so a smaller
    re-export leaves no stale pair behind.

    Raises:
        ValueError: unknown split, bad limits, no corpus manifest, no image in the split, or none readable.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if samples_per_shard < 1 or workers < 1:
        raise ValueError("samples_per_shard and workers must be at least 1")
    s3 = s3 or S3Settings()
    run, target = Storage(run_root, s3), Storage(out, s3)
    if not run.exists(MANIFEST_KEY):
        raise ValueError(f"{run.uri(MANIFEST_KEY)} does not exist: run 'ps3-engine build-corpus' first")
    parts = plan_export(run.read_json(MANIFEST_KEY), split, samples_per_shard)
    if not parts:
        raise ValueError(f"the corpus at {run.root_uri} has no {split!r} images")
    with ThreadPoolExecutor(min(workers, len(parts)), thread_name_prefix="export") as pool:
        written = list(pool.map(lambda part: write_part(run, target, part, samples_per_shard, s3), parts))
    result = ExportResult(target.root_uri, split, 0, [])
    for shards, skipped in written:
        result.shards.extend(shards)
        result.skipped.extend(skipped)
    result.samples = sum(s["samples"] for s in result.shards)
    if result.samples == 0:
        raise ValueError(f"no image of the {split!r} split could be read; see the log for each one")
    _finish(target, result)
    logger.info("export: %d samples in %d shard pairs under %s", result.samples, len(result.shards), out)
    return result


def _finish(target: Storage, result: ExportResult) -> None:
    written = {s["images"] for s in result.shards} | {s["text_boxes"] for s in result.shards}
    for prefix in (IMAGES_DIR, TEXT_BOXES_DIR):
        for obj in target.list(prefix + "/"):
            if obj.key.endswith(".tar") and obj.key not in written:
                target.delete(obj.key)
    for prefix, column in ((IMAGES_DIR, "images"), (TEXT_BOXES_DIR, "text_boxes")):
        sizes = {s[column].rsplit("/", 1)[-1]: s["samples"] for s in result.shards}
        target.write_json_atomic(f"{prefix}/sizes.json", sizes)
    target.write_json_atomic(EXPORT_MANIFEST, result.manifest)

"""ps3-engine export webdataset: the corpus as NVlabs/PS3's two parallel WebDatasets, read back with webdataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.corpus import MANIFEST_KEY, OutputShard, RowSlice, _manifest, write_output_shard
from ps3_engine.pipeline.export import export_webdataset, upright_jpeg
from ps3_engine.schemas.corpus import CORPUS_PART_SCHEMA
from ps3_engine.stages.corpus import CorpusConfig
from tests.support.corpus_run import ProvenanceRun, build_provenance_run


@pytest.fixture(scope="module")
def provenance_run(tiny_captioner, tmp_path_factory) -> ProvenanceRun:
    return build_provenance_run(tmp_path_factory.getbasetemp() / "provenance-run", tiny_captioner)


def corpus_by_id(root: Path) -> dict[str, dict]:
    files = sorted((root / "dataset" / "images" / "train").glob("*.parquet"))
    return {r["image_id"]: r for f in files for r in pq.read_table(f).to_pylist()}


def read_pairs(out: Path) -> list[tuple[dict, dict]]:
    """(image sample, text-box sample) pairs, iterated in lockstep as NVlabs' CombinedDataset does."""
    images = wds.WebDataset(sorted(str(p) for p in (out / "images").glob("image_*.tar")), shardshuffle=False)
    texts = wds.WebDataset(sorted(str(p) for p in (out / "text_boxes").glob("text_box_*.tar")), shardshuffle=False)
    return list(zip(images.decode("pilrgb"), texts.decode(), strict=True))


def test_webdataset_pairs_have_matching_keys_and_the_corpus_boxes(provenance_run, tmp_path):
    out = tmp_path / "wds"
    assert main(["export", "webdataset", str(provenance_run.root), str(out), "--samples-per-shard", "1"]) == 0
    corpus = corpus_by_id(provenance_run.root)
    pairs = read_pairs(out)
    assert sorted(p.name for p in (out / "images").glob("*.tar")) == ["image_00000.tar", "image_00001.tar"]
    assert sorted(p.name for p in (out / "text_boxes").glob("*.tar")) == ["text_box_00000.tar", "text_box_00001.tar"]
    assert [image["__key__"] for image, _ in pairs] == ["00000001", "00000002"]
    assert len(pairs) == len(corpus)
    for image, text in pairs:
        assert image["__key__"] == text["__key__"] and set(image) >= {"jpg"} and set(text) >= {"json"}
        record = text["json"]
        row = corpus[record["image_id"]]
        assert record["box"] == [[r["x0"], r["y0"], r["x1"], r["y1"]] for r in row["regions"]]
        assert record["text"] == [r["caption"] for r in row["regions"]]
        assert record["global_text"] == row["global_caption"] and record["type"] == row["source_type"] == "natural"
        assert image["jpg"].size == (row["width"], row["height"])
        with Image.open(io.BytesIO(row["image_bytes"])) as stored:
            assert np.abs(np.asarray(image["jpg"], np.int16) - np.asarray(stored.convert("RGB"), np.int16)).max() == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["samples"] == 2 and manifest["train_data_image"].endswith("images/image_{00000..00001}.tar")
    assert json.loads((out / "images" / "sizes.json").read_text()) == {"image_00000.tar": 1, "image_00001.tar": 1}


def test_rotated_photo_is_exported_upright_so_its_box_covers_the_planted_object(provenance_run, tmp_path):
    export_webdataset(str(provenance_run.root), str(tmp_path / "wds"))
    (planted,) = provenance_run.planted
    centre = ((planted[0] + planted[2]) // 2, (planted[1] + planted[3]) // 2)
    for image, text in read_pairs(tmp_path / "wds"):
        if text["json"]["url"].endswith("rotated.jpg"):
            assert image["jpg"].size == provenance_run.upright.size
            boxes = [b for b in text["json"]["box"] if b[0] <= centre[0] < b[2] and b[1] <= centre[1] < b[3]]
            assert boxes
            crop = np.asarray(image["jpg"].crop(boxes[0]), np.float32)
            assert np.abs(crop - np.asarray(provenance_run.upright.crop(boxes[0]), np.float32)).mean() < 6
            return
    pytest.fail("the rotated photo is not in the export")


def test_a_smaller_re_export_removes_stale_shards_and_s3_gets_the_same_bytes(provenance_run, tmp_path, s3_bucket):
    out = tmp_path / "wds"
    export_webdataset(str(provenance_run.root), str(out), samples_per_shard=1)
    export_webdataset(str(provenance_run.root), str(out))
    assert sorted(p.name for p in out.rglob("*.tar")) == ["image_00000.tar", "text_box_00000.tar"]

    remote = f"s3://{s3_bucket}/export"
    result = export_webdataset(str(provenance_run.root), remote)
    storage = Storage(remote)
    for shard in result.shards:  # tar members carry fixed metadata: the same corpus gives the same bytes
        for key in (shard["images"], shard["text_boxes"]):
            assert storage.read_bytes(key) == (out / key).read_bytes(), key
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes("text_boxes/text_box_00000.tar"))) as tar:
        assert tar.getnames() == ["00000001.json", "00000002.json"]


def test_upright_jpeg_applies_the_orientation_and_copies_upright_jpegs():
    upright = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(upright_jpeg(sideways.getvalue(), 6))) as fixed:
        assert fixed.size == (64, 48) and fixed.format == "JPEG"
        assert np.abs(np.asarray(fixed, np.float32) - np.asarray(upright, np.float32)).mean() < 3
    plain = io.BytesIO()
    upright.save(plain, "JPEG")
    assert upright_jpeg(plain.getvalue(), 1) == plain.getvalue()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["export", "webdataset", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "build-corpus" in error


def _small_corpus(root: Path, sizes: tuple[int, ...], unreadable: set[int]) -> None:
    """Packed corpus shards of ``sizes`` rows (tiny JPEGs); rows in ``unreadable`` reference an HTTP URL."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 40, 40)).save(buffer, "JPEG")
    storage, rows = Storage(str(root)), []
    for i in range(sum(sizes)):
        rows.append(
            {
                "image_id": f"img-{i}",
                "split": "train",
                "source_type": "natural",
                "url": f"http://example.org/{i}.jpg",
                "final_url": None,
                "source_list": "list.parquet",
                "image_bytes": None if i in unreadable else buffer.getvalue(),
                "image_ref": f"http://example.org/{i}.jpg" if i in unreadable else None,
                "exif_orientation": 1,
                "width": 32,
                "height": 24,
                "license": None,
                "attribution": None,
                "global_caption": None,
                "regions": [{"region_id": f"r{i}", "x0": 1, "y0": 2, "x1": 30, "y1": 20, "caption": f"box {i}"}],
                "input_columns_json": "{}",
            }
        )
    storage.write_parquet_atomic("corpus/part-0.parquet", pa.Table.from_pylist(rows, CORPUS_PART_SCHEMA))
    starts = np.cumsum((0, *sizes))
    plan = [
        OutputShard("train", k, [RowSlice("corpus/part-0.parquet", tuple(range(starts[k], starts[k + 1])))], build="t")
        for k in range(len(sizes))
    ]
    written = [write_output_shard(storage, shard) for shard in plan]
    storage.write_json_atomic(MANIFEST_KEY, _manifest(written, "t", {}, CorpusConfig()))


def test_corpus_shards_export_in_parallel_with_keys_in_corpus_order_and_gaps_for_skipped_images(tmp_path):
    _small_corpus(tmp_path / "run", sizes=(3, 2), unreadable={3})
    result = export_webdataset(str(tmp_path / "run"), str(tmp_path / "wds"), samples_per_shard=2, workers=2)
    assert [s["samples"] for s in result.shards] == [2, 1, 1] and result.samples == 4
    assert [s["image_id"] for s in result.skipped] == ["img-3"]  # an http(s) reference is not fetched
    keys = {}
    for folder, member in (("images", "jpg"), ("text_boxes", "json")):
        for tar_path in sorted((tmp_path / "wds" / folder).glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                keys.setdefault(folder, []).append([n.removesuffix(f".{member}") for n in tar.getnames()])
    assert keys["images"] == keys["text_boxes"] == [["00000001", "00000002"], ["00000003"], ["00000005"]]
    records = [text["json"] for _, text in read_pairs(tmp_path / "wds")]
    assert [r["image_id"] for r in records] == ["img-0", "img-1", "img-2", "img-4"]
    assert all("global_text" not in r and r["box"] == [[1, 2, 30, 20]] for r in records)

"""ps3-engine export webdataset: the corpus as NVlabs/PS3's two parallel WebDatasets, read back with webdataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.export import export_webdataset, upright_jpeg
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

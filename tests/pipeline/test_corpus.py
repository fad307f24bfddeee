"""build-corpus end to end: a captioned run -> split Parquet shards any reader loads, a pairs view, a manifest.

One module-scoped run (6 generated scenes, classical boxes, the tiny local captioner on CPU) is built
once; tests that change settings work on a copy of its run root so they never disturb each other.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.corpus import MANIFEST_KEY
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.provenance import extra_columns_arrays, extra_columns_schema, schema_description
from ps3_engine.pipeline.runner import run_build_corpus, run_pipeline, stage_fingerprints
from ps3_engine.pipeline.samples import write_scenes
from ps3_engine.schemas.corpus import CORPUS_SCHEMA, SCHEMA_VERSION
from ps3_engine.stages.captioning.hygiene import clean_caption, strip_boilerplate
from ps3_engine.stages.corpus import split_for, upright_image_bytes
from tests.support.corpus_run import UPRIGHT_SIZE, ProvenanceRun, build_provenance_run

NUM_SCENES = 6
VALIDATION_FRACTION = 0.34


@dataclass(frozen=True)
class Run:
    folder: Path
    captioner: Path
    config: RunConfig

    @property
    def root(self) -> Path:
        return Path(self.config.run_root)

    def variant(self, run_root: str | Path, *overrides: str, folder: Path | None = None) -> RunConfig:
        return run_config(folder or self.folder, run_root, self.captioner, *overrides)

    def copy(self, destination: Path, *overrides: str) -> RunConfig:
        """A copy of this run's root (so a test can change settings on it) and its config with ``overrides``."""
        shutil.copytree(self.root, destination)
        return self.variant(destination, *overrides)


def run_config(folder: Path, run_root: str | Path, captioner: Path, *overrides: str) -> RunConfig:
    return load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.shard_size=2",
            "crawl.min_short_side=800",
            "crawl.min_long_side=800",
            "segment.backend=classical",
            "segment.mask_max_side=512",
            "caption.backend=transformers",
            f"caption.model={captioner}",
            "caption.transformers.device=cpu",
            "caption.max_pixels=12544",
            "caption.sampling.max_new_tokens=48",
            f"corpus.validation_fraction={VALIDATION_FRACTION}",
            *overrides,
        ],
        run_root=str(run_root),
        sources=[str(folder)],
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    write_scenes(folder, NUM_SCENES, size=(1200, 900))
    return folder


@pytest.fixture(scope="module")
def captioned(scenes, tiny_captioner, tmp_path_factory) -> Run:
    config = run_config(scenes, tmp_path_factory.mktemp("corpus") / "run", tiny_captioner)
    results = run_pipeline(config)
    assert [r.stage for r in results] == ["crawl", "segment", "caption", "build-corpus"]
    assert all(r.failed_shards == [] for r in results)
    assert results[-1].dataset["rebuilt"] is True
    return Run(scenes, tiny_captioner, config)


def shard_files(root: Path) -> list[Path]:
    return sorted((root / "dataset" / "images").glob("*/shard-*.parquet"))


def dataset_files(root: Path) -> set[str]:
    """Every Parquet file under dataset/ (corpus shards and pairs view), as keys relative to the run root."""
    return {str(p.relative_to(root)) for p in (root / "dataset").rglob("*.parquet")}


def corpus_rows(root: Path) -> list[dict]:
    return [row for path in shard_files(root) for row in pq.read_table(path).to_pylist()]


def regions_per_image(rows) -> dict[str, int]:
    return {row["image_id"]: len(row["regions"]) for row in rows}


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_KEY).read_text())


def test_polars_pyarrow_ray_and_hf_datasets_load_the_images_folder(captioned, ray_local, tmp_path):
    import datasets

    root = captioned.root
    images = root / "dataset" / "images"
    assert {p.parent.name for p in shard_files(root)} == {"train", "validation"}
    assert sorted(p.name for p in (root / "dataset").iterdir()) == ["README.md", "images", "manifest.json", "pairs"]

    frame = pl.read_parquet(str(images / "**" / "*.parquet"))
    by_polars = dict(zip(frame["image_id"], frame["regions"].list.len(), strict=True))
    table = pads.dataset(str(images), format="parquet").to_table()
    by_arrow = regions_per_image(table.select(["image_id", "regions"]).to_pylist())
    ray_images = ray_local.data.read_parquet(str(images))
    by_ray = regions_per_image(ray_images.take_all())
    # Split names come from the folder names; the manifest beside the folder is not read as data.
    hf = datasets.load_dataset(str(images), cache_dir=str(tmp_path / "hf"))
    assert set(hf) == {"train", "validation"}
    # The dataset card names both tables: the folder above loads too, images by default, pairs by name.
    card = datasets.load_dataset(str(root / "dataset"), cache_dir=str(tmp_path / "hf"))
    assert {s: card[s].num_rows for s in card} == {s: c["images"] for s, c in manifest(root)["counts"].items()}
    pairs = datasets.load_dataset(str(root / "dataset"), "pairs", cache_dir=str(tmp_path / "hf"))
    assert {s: pairs[s].num_rows for s in pairs} == {s: c["regions"] for s, c in manifest(root)["counts"].items()}
    by_hf = regions_per_image([row for split in hf.values() for row in split.select_columns(["image_id", "regions"])])

    assert len(by_polars) == frame.height == NUM_SCENES == ray_images.count() == table.num_rows
    assert by_arrow == by_polars and by_ray == by_polars and by_hf == by_polars
    assert all(n >= 1 for n in by_polars.values())
    assert sum(by_polars.values()) == sum(s["regions"] for s in manifest(root)["counts"].values())


def test_every_row_has_boxes_inside_clean_captions_and_its_hash_split(captioned):
    layout = RunLayout(Storage(str(captioned.root)))
    captions = {
        (r["image_id"], r["region_id"]): r["clean_text"]
        for shard in layout.manifests("caption")
        for r in layout.read_output("caption", shard).to_pylist()
    }
    rows = corpus_rows(captioned.root)
    expected_ids = {hashlib.sha256(p.read_bytes()).hexdigest() for p in captioned.folder.glob("*.jpg")}
    assert {r["image_id"] for r in rows} == expected_ids
    for row in rows:
        assert row["split"] == split_for(row["image_id"], VALIDATION_FRACTION, "ps3")
        assert row["source_list"] == str(captioned.folder) and row["source_type"] == "natural"
        assert Path(row["url"]).parent == captioned.folder and row["final_url"] is None  # a file, not HTTP
        with Image.open(io.BytesIO(row["image_bytes"])) as image:
            assert image.size == (row["width"], row["height"])
        assert row["global_caption"] == captions[(row["image_id"], None)]
        assert row["regions"], row["image_id"]
        for region in row["regions"]:
            assert 0 <= region["x0"] < region["x1"] <= row["width"]
            assert 0 <= region["y0"] < region["y1"] <= row["height"]
            caption = region["caption"]
            assert caption.strip() and caption == captions[(row["image_id"], region["region_id"])]
            assert strip_boilerplate(caption) == caption
            assert clean_caption(caption, "stop").reject_reason is None
    assert Counter(r["split"] for r in rows).keys() == {"train", "validation"}


def test_split_does_not_depend_on_the_shard_layout(captioned, tmp_path):
    other = captioned.variant(tmp_path / "run", "crawl.shard_size=4")
    results = run_pipeline(other)
    assert all(r.failed_shards == [] for r in results)
    first_layout = RunLayout(Storage(str(captioned.root))).manifests("crawl")
    second_layout = RunLayout(Storage(other.run_root)).manifests("crawl")
    assert (len(first_layout), len(second_layout)) == (3, 2)
    first = {r["image_id"]: r["split"] for r in corpus_rows(captioned.root)}
    second = {r["image_id"]: r["split"] for r in corpus_rows(tmp_path / "run")}
    assert second == first and len(first) == NUM_SCENES


def test_manifest_counts_match_the_shards_and_pairs_point_back(captioned):
    root = captioned.root
    found = manifest(root)
    assert found["schema_version"] == SCHEMA_VERSION and found["record_kind"] == "corpus_row"
    assert found["stage_fingerprints"] == stage_fingerprints(captioned.config)
    assert {"crawl", "segment", "caption", "corpus", "render", "document-corpus"} == set(found["stage_fingerprints"])
    assert found["sources"] == {str(captioned.folder): NUM_SCENES}
    tables = {str(p.relative_to(root)): pq.read_table(p) for p in shard_files(root)}
    assert {s["key"] for s in found["shards"]} == set(tables)
    for split in ("train", "validation"):
        mine = [t for key, t in tables.items() if key.startswith(f"dataset/images/{split}/")]
        counts = found["counts"][split]
        assert counts["images"] == sum(t.num_rows for t in mine) > 0
        assert counts["regions"] == sum(len(r) for t in mine for r in t.column("regions").to_pylist())
        assert counts["global_captions"] == sum(t.num_rows - t.column("global_caption").null_count for t in mine)
        assert counts["shards"] == len(mine)
    for shard in found["shards"]:
        assert shard["sha256"] == hashlib.sha256((root / shard["key"]).read_bytes()).hexdigest()
        assert shard["pairs_sha256"] == hashlib.sha256((root / shard["pairs_key"]).read_bytes()).hexdigest()

    pairs = pl.read_parquet(str(root / "dataset" / "pairs" / "*" / "shard-*.parquet")).to_dicts()
    assert len(pairs) == sum(c["regions"] for c in found["counts"].values())
    for pair in pairs:
        image = tables[pair["corpus_shard"]].slice(pair["row_index"], 1).to_pylist()[0]
        assert (image["image_id"], image["split"]) == (pair["image_id"], pair["split"])
        region = {k: pair[k] for k in ("region_id", "x0", "y0", "x1", "y1", "caption")}
        assert region in image["regions"]
        pair_image = (pair["width"], pair["height"], pair["url"], pair["source_list"])
        assert pair_image == (image["width"], image["height"], image["url"], image["source_list"])
    assert len({(p["image_id"], p["region_id"]) for p in pairs}) == len(pairs)


def test_rerun_of_build_corpus_is_a_no_op(captioned, tmp_path):
    config = captioned.copy(tmp_path / "run")
    root = tmp_path / "run"
    before = {key: (root / key).stat().st_mtime_ns for key in dataset_files(root)}
    manifest_bytes = (root / MANIFEST_KEY).read_bytes()
    result = run_build_corpus(config)
    assert result.dataset["rebuilt"] is False and result.computed_shards == 0
    assert result.skipped_shards == 3
    assert (root / MANIFEST_KEY).read_bytes() == manifest_bytes
    assert {key: (root / key).stat().st_mtime_ns for key in dataset_files(root)} == before


@pytest.mark.parametrize("damage", ["appended", "cut", "deleted"])
def test_rerun_repacks_a_damaged_dataset_file(captioned, tmp_path, damage):
    """Issue 14 kind 4, sibling: a packed dataset file changed after its build was taken as up to date."""
    import hashlib
    import os

    config = captioned.copy(tmp_path / "run")
    root = tmp_path / "run"
    shard = manifest(root)["shards"][0]
    victim = root / (shard["key"] if damage != "cut" else shard["pairs_key"])
    if damage == "appended":
        victim.write_bytes(victim.read_bytes() + b"junk")
    elif damage == "cut":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        victim.unlink()
    result = run_build_corpus(config)
    assert result.dataset["rebuilt"] is True
    for entry in manifest(root)["shards"]:
        assert hashlib.sha256((root / entry["key"]).read_bytes()).hexdigest() == entry["sha256"]
        assert hashlib.sha256((root / entry["pairs_key"]).read_bytes()).hexdigest() == entry["pairs_sha256"]


def test_smaller_target_repacks_and_stale_shards_are_deleted(captioned, tmp_path):
    root = tmp_path / "run"
    config = captioned.copy(root)
    images = regions_per_image(corpus_rows(root))
    small = run_build_corpus(captioned.variant(root, "corpus.target_shard_bytes=20000"))
    assert small.dataset["rebuilt"] is True and small.computed_shards == 0  # only the pack changed
    packed = manifest(root)
    assert packed["counts"]["train"]["shards"] + packed["counts"]["validation"]["shards"] > 2
    assert regions_per_image(corpus_rows(root)) == images
    listed = {s["key"] for s in packed["shards"]} | {s["pairs_key"] for s in packed["shards"]}
    assert dataset_files(root) == listed
    assert any(k.startswith("dataset/images/train/shard-") and k.endswith("-00001.parquet") for k in listed)

    large = run_build_corpus(config)  # back to the default target: one shard per split
    assert large.dataset["rebuilt"] is True
    repacked = manifest(root)
    assert {s: c["shards"] for s, c in repacked["counts"].items()} == {"train": 1, "validation": 1}
    assert dataset_files(root) == {s["key"] for s in repacked["shards"]} | {s["pairs_key"] for s in repacked["shards"]}
    assert not any((root / key).exists() for key in listed)  # the small build's files are gone
    assert regions_per_image(corpus_rows(root)) == images


def test_pack_written_by_ray_tasks_equals_the_local_pack(captioned, ray_local, tmp_path):
    run_build_corpus(captioned.copy(tmp_path / "local", "corpus.target_shard_bytes=20000"))
    on_ray = captioned.copy(tmp_path / "ray", "corpus.target_shard_bytes=20000", "executor.kind=ray")
    result = run_build_corpus(on_ray)
    assert result.dataset["rebuilt"] is True and result.computed_shards == 0
    local, remote = manifest(tmp_path / "local"), manifest(tmp_path / "ray")
    assert len(remote["shards"]) > 2
    assert remote["shards"] == local["shards"] and remote["counts"] == local["counts"]


def test_manifest_describes_the_config_of_the_latest_build(captioned, tmp_path):
    root = tmp_path / "run"
    fraction = VALIDATION_FRACTION + 0.001
    config = captioned.copy(root, f"corpus.validation_fraction={fraction}")
    ids = [r["image_id"] for r in corpus_rows(root)]
    if any(split_for(i, fraction, "ps3") != split_for(i, VALIDATION_FRACTION, "ps3") for i in ids):
        pytest.fail("precondition: the new fraction must not move any image")
    result = run_build_corpus(config)
    if result.computed_shards != 3:
        pytest.fail("precondition: a semantic corpus change recomputes every per-shard corpus file")
    found = manifest(root)
    assert found["stage_fingerprints"] == stage_fingerprints(config)
    assert found["config"]["validation_fraction"] == fraction


def test_reference_storage_writes_image_refs_instead_of_bytes(captioned, tmp_path):
    root = tmp_path / "run"
    originals = {r["image_id"]: r["image_bytes"] for r in corpus_rows(captioned.root)}
    result = run_build_corpus(captioned.copy(root, "corpus.image_storage=reference"))
    assert result.computed_shards == 3 and result.dataset["rebuilt"] is True
    rows = corpus_rows(root)
    assert {r["image_id"] for r in rows} == set(originals)
    for row in rows:
        assert row["image_bytes"] is None
        assert Path(row["image_ref"]).parent == captioned.folder
        assert Path(row["image_ref"]).read_bytes() == originals[row["image_id"]]
    assert manifest(root)["config"]["image_storage"] == "reference"


@pytest.mark.parametrize(
    ("stages", "override"),
    [
        (("build-corpus",), "corpus.min_local_captions=99"),
        # Every caption fails hygiene: the caption shards hold no rows at all.
        (("caption", "build-corpus"), "caption.hygiene.min_words=99"),
    ],
    ids=["min-local-captions", "no-usable-captions"],
)
def test_images_without_enough_captions_become_filtered_error_rows(captioned, tmp_path, stages, override):
    root = tmp_path / "run"
    config = captioned.copy(root, override)
    result = run_pipeline(config, stages)[-1]
    layout = RunLayout(Storage(str(root)))
    with_regions = {
        r["image_id"] for s in layout.manifests("segment") for r in layout.read_output("segment", s).to_pylist()
    }
    errors = layout.read_errors("corpus").to_pylist()
    kept = {r["image_id"] for r in corpus_rows(root)}
    assert len(with_regions) == NUM_SCENES
    assert {e["reason"] for e in errors} == {"too_few_captions"}
    assert {e["category"] for e in errors} == {"filtered"} and {e["stage"] for e in errors} == {"corpus"}
    assert len(kept) + len(errors) == len(with_regions)
    assert kept | {e["item_id"] for e in errors} == with_regions
    assert result.filtered_by_reason == {"too_few_captions": NUM_SCENES} and result.kept_rows == 0
    assert manifest(root)["counts"] == {} and dataset_files(root) == set()


def test_s3_run_root_gives_a_dataset_polars_reads_with_storage_options(captioned, s3_bucket, tmp_path):
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted(captioned.folder.glob("*.jpg"))[:3]:
        shutil.copy(path, subset / path.name)
    config = captioned.variant(f"s3://{s3_bucket}/run", folder=subset)
    results = run_pipeline(config)
    assert all(r.failed_shards == [] for r in results) and results[-1].dataset["rebuilt"] is True
    storage = Storage(config.run_root, config.s3)
    frame = pl.read_parquet(
        storage.uri("dataset/images") + "/*/shard-*.parquet", storage_options=storage.polars_storage_options()
    )
    local = {r["image_id"]: r for r in corpus_rows(captioned.root)}
    expected = {hashlib.sha256(p.read_bytes()).hexdigest() for p in subset.glob("*.jpg")}
    assert set(frame["image_id"]) == expected and expected <= set(local)
    for row in frame.to_dicts():
        assert row["split"] == local[row["image_id"]]["split"]
        assert len(row["regions"]) == len(local[row["image_id"]]["regions"])

    # The pack is planned from object sizes listed on S3 and stale objects are deleted there too.
    small = run_build_corpus(captioned.variant(config.run_root, "corpus.target_shard_bytes=20000", folder=subset))
    assert small.dataset["rebuilt"] is True and len(storage.read_json(MANIFEST_KEY)["shards"]) == len(expected)
    assert all(storage.exists(s["key"]) for s in storage.read_json(MANIFEST_KEY)["shards"])
    run_build_corpus(config)
    shards = storage.read_json(MANIFEST_KEY)["shards"]
    assert len(shards) == 2
    listed = {o.key for o in storage.list("dataset/") if o.key.endswith(".parquet")}
    assert listed == {s["key"] for s in shards} | {s["pairs_key"] for s in shards}


# -- provenance and orientation (a Parquet URL list over loopback HTTP, with a rotated photo) -------
@pytest.fixture(scope="module")
def provenance_run(tiny_captioner, tmp_path_factory) -> ProvenanceRun:
    return build_provenance_run(tmp_path_factory.getbasetemp() / "provenance-run", tiny_captioner)


def _rows_by_name(run: ProvenanceRun) -> dict[str, dict]:
    rows = corpus_rows(run.root)
    return {PurePosixPath(r["final_url"]).name: r for r in rows}


def test_corpus_rows_carry_the_url_licence_and_the_input_columns_by_name(provenance_run):
    run = provenance_run
    rows = _rows_by_name(run)
    assert set(rows) == set(run.rows)
    for name, row in rows.items():
        listed = run.rows[name]
        assert row["url"] == listed["url"] and row["source_list"] == str(run.list_path)
        assert (row["license"], row["attribution"]) == (listed["license"], listed["author"])
        assert (row["alt_text"], row["tags"]) == (listed["alt_text"], listed["tags"])
        assert row["input_width"] == listed["width"]  # "width" clashes with the corpus column
        assert row["score"] == pytest.approx(listed["score"])
        assert row["taken_at"] == (None if listed["taken_at"] is None else str(listed["taken_at"]))
    assert rows["rotated.jpg"]["url"].endswith("/moved/rotated.jpg")  # listed behind a redirect
    assert rows["rotated.jpg"]["final_url"] == rows["rotated.jpg"]["url"].replace("/moved/", "/")
    assert rows["plain.jpg"]["final_url"] == rows["plain.jpg"]["url"]

    schema = pq.read_schema(shard_files(run.root)[0])
    assert schema.names[: len(CORPUS_SCHEMA)] == CORPUS_SCHEMA.names
    extra = {f.name: f for f in list(schema)[len(CORPUS_SCHEMA) :]}
    assert list(extra) == ["alt_text", "score", "tags", "input_width", "taken_at"]
    assert (extra["score"].type, extra["tags"].type) == (pa.float32(), pa.list_(pa.string()))
    assert extra["input_width"].type == pa.int16() and extra["input_width"].metadata[b"input_column"] == b"width"
    assert extra["taken_at"].type == pa.string()  # JSON carries timestamps as text; the declared type is kept
    assert extra["taken_at"].metadata[b"declared_type"].startswith(b"timestamp")
    described = {c["name"]: c for c in manifest(run.root)["extra_columns"]}
    assert list(described) == list(extra) and described["input_width"]["input_column"] == "width"
    assert described["score"]["source_lists"] == [str(run.list_path)]
    assert manifest(run.root)["box_convention"] == CORPUS_SCHEMA.metadata[b"box_convention"].decode()
    box_field = CORPUS_SCHEMA.field("regions").type.value_type.field("x1")
    assert box_field.metadata[b"interval"] == b"half-open" and box_field.metadata[b"frame"] == b"upright"


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB"), np.float32) - np.asarray(b.convert("RGB"), np.float32)).mean())


def test_an_orientation_6_photo_is_stored_upright_and_its_boxes_land_on_the_planted_object(provenance_run):
    run = provenance_run
    row = _rows_by_name(run)["rotated.jpg"]
    original = (run.list_path.parent / "rotated.jpg").read_bytes()
    with Image.open(io.BytesIO(original)) as raw:
        assert raw.size == UPRIGHT_SIZE[::-1] and raw.getexif()[0x0112] == 6  # precondition: stored sideways
    loaded = Image.open(io.BytesIO(row["image_bytes"]))  # no transpose: the bytes are upright
    assert loaded.size == (row["width"], row["height"]) == UPRIGHT_SIZE
    assert loaded.getexif().get(0x0112, 1) == 1 and row["exif_orientation"] == 1
    assert _mean_difference(loaded, run.upright) < 4  # re-encoded at quality 95: visually the same
    (planted,) = run.planted
    centre = ((planted[0] + planted[2]) // 2, (planted[1] + planted[3]) // 2)
    hits = [r for r in row["regions"] if r["x0"] <= centre[0] < r["x1"] and r["y0"] <= centre[1] < r["y1"]]
    assert hits, (planted, row["regions"])
    for region in row["regions"]:
        box = (region["x0"], region["y0"], region["x1"], region["y1"])
        assert _mean_difference(loaded.crop(box), run.upright.crop(box)) < 6, box
    # The same box on the original (sideways) pixels shows something else: the check above has teeth.
    box = (hits[0]["x0"], hits[0]["y0"], hits[0]["x1"], hits[0]["y1"])
    with Image.open(io.BytesIO(original)) as raw:
        assert _mean_difference(raw.crop(box), run.upright.crop(box)) > 20


def test_upright_re_encoding_keeps_png_lossless_and_resets_the_orientation():
    upright = Image.effect_noise((64, 48), 80).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_270).save(buffer, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(upright_image_bytes(buffer.getvalue()))) as fixed:
        assert fixed.format == "PNG" and fixed.getexif().get(0x0112, 1) == 1
        assert np.array_equal(np.asarray(fixed), np.asarray(upright))


# -- extra columns: declared types, unification, clashes -------------------------------------------
def test_extra_columns_take_the_lists_declared_types(tmp_path):
    first, second, text = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.csv"
    pq.write_table(pa.table({"URL": ["u"], "n": pa.array([1], pa.int32()), "image_id": ["x"], "Licence": ["l"]}), first)
    pq.write_table(pa.table({"url": ["u"], "n": pa.array([2], pa.int64()), "blob": pa.array([b"\x00"])}), second)
    text.write_bytes("\ufeffimage_url,caption,k\nhttp://x/a.jpg,a cat,3\n".encode())  # with a byte-order mark
    lists = [str(first), str(second)]
    schema = extra_columns_schema([*lists, str(text), str(tmp_path)], S3Settings())  # a folder adds none
    assert [(f.name, str(f.type)) for f in schema] == [
        ("n", "int64"),  # int32 and int64 unify
        ("input_image_id", "string"),  # clashes with the corpus column
        ("blob", "string"),  # binary does not survive JSON: stored as text
        ("caption", "string"),  # CSV declares no types
        ("k", "string"),
    ]
    described = {c["name"]: c for c in schema_description(schema)}
    assert described["blob"]["declared_type"] == "binary" and described["input_image_id"]["input_column"] == "image_id"
    assert described["n"]["source_lists"] == sorted(lists)
    text.write_text("url,n\nhttp://x/a.jpg,3\n")
    mixed = extra_columns_schema([*lists, str(text)], S3Settings()).field("n")
    assert mixed.type == pa.string()  # int and text do not unify: stored as text


def test_values_that_do_not_fit_their_column_become_null():
    schema = pa.schema([pa.field("n", pa.int32(), metadata={"input_column": "n"})])
    (column,) = extra_columns_arrays(['{"n": 1}', '{"n": "many"}', "{}", None], schema)
    assert column.to_pylist() == [1, None, None, None]

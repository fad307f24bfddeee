"""Cross-shard dedup: exact (sha256) and near (pHash) duplicates, on hand-built rows and through a crawl."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.dedup import find_duplicates
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl
from ps3_engine.pipeline.samples import synthetic_scene
from ps3_engine.stages.imaging import hamming_distance

FAR_HASHES = [0, 2**64 - 1, 0x5555_5555_5555_5555, 0xAAAA_AAAA_0000_0000, 0x0000_0000_FFFF_FFFF]


def row(index: int, *, sha: str, phash: int, size: tuple[int, int] = (100, 100), num_bytes: int = 1000) -> dict:
    return {
        "item_id": f"item-{index}",
        "shard_id": "s-00000",
        "source_ref": f"/images/{index}.jpg",
        "sha256": sha,
        "phash": phash,
        "width": size[0],
        "height": size[1],
        "num_bytes": num_bytes,
    }


def flip(phash: int, *bits: int) -> int:
    for bit in bits:
        phash ^= 1 << bit
    return phash


def kept_indices(rows: list[dict], drops: list[tuple[int, int, str, int]]) -> set[int]:
    return set(range(len(rows))) - {dropped for dropped, *_ in drops}


# -- find_duplicates on hand-built rows -----------------------------------------------------------


def test_distinct_images_are_untouched():
    rows = [row(i, sha=f"sha{i}", phash=h) for i, h in enumerate(FAR_HASHES)]
    assert find_duplicates(rows, max_distance=4) == []


def test_exact_duplicates_keep_the_first_row():
    rows = [
        row(0, sha="a", phash=FAR_HASHES[0]),
        row(1, sha="b", phash=FAR_HASHES[1]),
        row(2, sha="a", phash=FAR_HASHES[0]),
        row(3, sha="a", phash=FAR_HASHES[0]),
    ]
    assert find_duplicates(rows, max_distance=0) == [(2, 0, "duplicate_exact", 0), (3, 0, "duplicate_exact", 0)]


@pytest.mark.parametrize("max_distance", [0, 1, 4, 10, 16])
def test_near_duplicates_are_linked_up_to_max_distance_inclusive(max_distance):
    base = 0x0123_4567_89AB_CDEF
    at_limit = flip(base, *range(0, 64, 64 // max(max_distance, 1))[:max_distance])
    beyond = flip(at_limit, 63 if max_distance else 5)
    assert hamming_distance(base, at_limit) == max_distance
    assert hamming_distance(base, beyond) == max_distance + 1
    small, large = (100, 100), (200, 100)
    linked = [row(0, sha="x", phash=at_limit, size=small), row(1, sha="y", phash=base, size=large)]
    assert find_duplicates(linked, max_distance) == [(0, 1, "near_duplicate", max_distance)]
    apart = [row(0, sha="x", phash=beyond, size=small), row(1, sha="y", phash=base, size=large)]
    assert find_duplicates(apart, max_distance) == []


def test_near_cluster_keeps_most_pixels_then_most_bytes_then_first():
    base = FAR_HASHES[2]
    rows = [
        row(0, sha="a", phash=base, size=(300, 200), num_bytes=9000),
        row(1, sha="b", phash=flip(base, 1), size=(400, 300), num_bytes=100),
        row(2, sha="c", phash=flip(base, 2), size=(300, 400), num_bytes=500),
    ]
    assert find_duplicates(rows, 4) == [(0, 2, "near_duplicate", 1), (1, 2, "near_duplicate", 2)]
    same_pixels = [
        row(0, sha="a", phash=base, num_bytes=100),
        row(1, sha="b", phash=flip(base, 7), num_bytes=200),
        row(2, sha="c", phash=flip(base, 9), num_bytes=200),
    ]
    assert find_duplicates(same_pixels, 4) == [(0, 1, "near_duplicate", 1), (2, 1, "near_duplicate", 2)]


def test_chains_merge_into_one_cluster_with_one_representative():
    # a ~ b ~ c ~ d in steps of 4 bits, while a and d are 12 bits apart.
    a = FAR_HASHES[3]
    b = flip(a, 0, 17, 34, 51)
    c = flip(b, 3, 20, 37, 54)
    d = flip(c, 6, 23, 40, 57)
    assert hamming_distance(a, d) == 12
    rows = [
        row(0, sha="a", phash=a, size=(100, 100)),
        row(1, sha="b", phash=b, size=(100, 100)),
        row(2, sha="d", phash=d, size=(500, 500)),
        row(3, sha="other", phash=FAR_HASHES[0]),
        row(4, sha="c", phash=c, size=(100, 100)),
    ]
    drops = find_duplicates(rows, max_distance=4)
    assert kept_indices(rows, drops) == {2, 3}
    assert drops == [
        (0, 2, "near_duplicate", 12),
        (1, 2, "near_duplicate", 8),
        (4, 2, "near_duplicate", 4),
    ]


def test_every_drop_points_at_a_row_that_is_kept():
    rows = [
        row(0, sha="a", phash=FAR_HASHES[2], size=(100, 100)),
        row(1, sha="a", phash=FAR_HASHES[2], size=(100, 100)),
        row(2, sha="b", phash=flip(FAR_HASHES[2], 5), size=(200, 200)),
    ]
    drops = find_duplicates(rows, max_distance=4)
    assert kept_indices(rows, drops) == {2}
    assert {kept for _, kept, *_ in drops} <= kept_indices(rows, drops)
    # Both copies of "a" are near duplicates of the representative, whose bytes differ from theirs.
    assert drops == [(0, 2, "near_duplicate", 1), (1, 2, "near_duplicate", 1)]


def test_copies_of_the_representative_are_exact_duplicates_of_it():
    rows = [
        row(0, sha="a", phash=FAR_HASHES[2], size=(100, 100)),
        row(1, sha="b", phash=flip(FAR_HASHES[2], 5), size=(200, 200)),
        row(2, sha="a", phash=FAR_HASHES[2], size=(100, 100)),
        row(3, sha="b", phash=flip(FAR_HASHES[2], 5), size=(200, 200)),
    ]
    assert find_duplicates(rows, max_distance=4) == [
        (0, 1, "near_duplicate", 1),
        (2, 1, "near_duplicate", 1),
        (3, 1, "duplicate_exact", 0),
    ]


@given(
    base=st.integers(min_value=0, max_value=2**64 - 1),
    max_distance=st.integers(min_value=0, max_value=16),
    bits=st.sets(st.integers(min_value=0, max_value=63), max_size=20),
)
def test_any_pair_within_max_distance_is_found(base, max_distance, bits):
    other = flip(base, *bits)
    rows = [row(0, sha="x", phash=other), row(1, sha="y", phash=base, size=(101, 100))]
    expected = [(0, 1, "near_duplicate", len(bits))] if len(bits) <= max_distance else []
    assert find_duplicates(rows, max_distance) == expected


@st.composite
def image_rows(draw):
    """Rows of a few distinct images (unique sizes), some near each other, each appearing one or more times."""
    seeds = draw(st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=4))
    num_images = draw(st.integers(min_value=1, max_value=10))
    images = []
    for index in range(num_images):
        seed = draw(st.sampled_from(seeds))
        bits = draw(st.sets(st.integers(min_value=0, max_value=63), max_size=6))
        pixels = draw(st.integers(min_value=1, max_value=50))
        images.append({"sha": f"sha{index}", "phash": flip(seed, *bits), "size": (pixels, 10), "bytes": 1000 + index})
    copies = draw(st.lists(st.sampled_from(images), min_size=len(images), max_size=3 * len(images)))
    ordered = images + copies
    order = draw(st.permutations(range(len(ordered))))
    return [ordered[i] for i in order]


def oracle_kept(images: list[dict], max_distance: int) -> set[str]:
    """Brute force: connected components of distinct images, each keeping its (pixels, bytes) maximum."""
    distinct = list({image["sha"]: image for image in images}.values())
    component = list(range(len(distinct)))
    for i, a in enumerate(distinct):
        for j, b in enumerate(distinct[:i]):
            if hamming_distance(a["phash"], b["phash"]) <= max_distance:
                old, new = component[i], component[j]
                component = [new if c == old else c for c in component]
    best: dict[int, dict] = {}
    for label, image in zip(component, distinct, strict=True):
        key = (image["size"][0] * image["size"][1], image["bytes"])
        if label not in best or key > (best[label]["size"][0] * best[label]["size"][1], best[label]["bytes"]):
            best[label] = image
    return {image["sha"] for image in best.values()}


@given(images=image_rows(), max_distance=st.integers(min_value=0, max_value=8), data=st.data())
def test_kept_images_match_a_brute_force_clustering_whatever_the_row_order(images, max_distance, data):
    rows = [
        row(i, sha=image["sha"], phash=image["phash"], size=image["size"], num_bytes=image["bytes"])
        for i, image in enumerate(images)
    ]
    drops = find_duplicates(rows, max_distance)
    dropped = [d[0] for d in drops]
    assert drops == sorted(drops) and len(dropped) == len(set(dropped))
    kept = kept_indices(rows, drops)
    assert {k for _, k, _, _ in drops} <= kept
    for index, k, reason, distance in drops:
        same_bytes = rows[index]["sha256"] == rows[k]["sha256"]
        assert reason == ("duplicate_exact" if same_bytes else "near_duplicate")
        assert distance == hamming_distance(rows[index]["phash"], rows[k]["phash"])
    expected = oracle_kept(images, max_distance)
    assert sorted(rows[i]["sha256"] for i in kept) == sorted(expected)
    kept_digests = [rows[i]["sha256"] for i in kept]
    copies_of_kept = sum(r["sha256"] in kept_digests for r in rows) - len(kept)
    assert sum(reason == "duplicate_exact" for _, _, reason, _ in drops) == copies_of_kept
    shuffled = data.draw(st.permutations(rows))
    again = find_duplicates(shuffled, max_distance)
    assert {shuffled[i]["sha256"] for i in kept_indices(shuffled, again)} == expected


# -- through a crawl ------------------------------------------------------------------------------

FOLDER_OVERRIDES = [
    "executor.kind=local",
    "executor.progress=false",
    "crawl.min_short_side=64",
    "crawl.min_long_side=64",
    "crawl.shard_size=2",
]


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """original, its byte copy (same shard), a cropped+resized re-encode (next shard) and a distinct image."""
    folder = tmp_path_factory.mktemp("dedup-images")
    original = encode_jpeg(synthetic_scene(320, 240, 0), quality=90)
    near = Image.open(io.BytesIO(original)).crop((4, 3, 316, 237)).resize((256, 192))
    (folder / "a-original.jpg").write_bytes(original)
    (folder / "b-copy.jpg").write_bytes(original)
    (folder / "c-near.jpg").write_bytes(encode_jpeg(near, quality=70))
    (folder / "d-other.jpg").write_bytes(encode_jpeg(synthetic_scene(320, 240, 5), quality=90))
    return folder


def crawl(folder: Path, run_root: Path, *overrides: str):
    config = load_run_config(None, [*FOLDER_OVERRIDES, *overrides], run_root=str(run_root), sources=[str(folder)])
    return run_crawl(config)


def files_of(run_root: Path) -> dict[Path, tuple[int, bytes]]:
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in run_root.rglob("*")
        if p.is_file() and p.name != "summary.json"
    }


def crawl_shard_files(run_root: Path) -> dict[Path, tuple[int, bytes]]:
    """Inputs, outputs, errors and manifests of the crawl shards (not the run snapshot nor the dedup)."""
    return {p: v for p, v in files_of(run_root / "crawl").items() if "_dedup" not in p.parts}


@pytest.fixture(scope="module")
def first_run(image_folder, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("dedup-run")
    return run_root, crawl(image_folder, run_root)


def test_crawl_drops_exact_and_near_copies_across_shards(first_run):
    run_root, result = first_run
    layout = RunLayout(Storage(str(run_root)))
    assert len(layout.manifests("crawl")) == result.computed_shards == 2
    images = {
        Path(r["source_ref"]).name: r
        for s in layout.manifests("crawl")
        for r in layout.read_output("crawl", s).to_pylist()
    }
    assert sorted(images) == ["a-original.jpg", "b-copy.jpg", "c-near.jpg", "d-other.jpg"]
    near_distance = hamming_distance(images["a-original.jpg"]["phash"], images["c-near.jpg"]["phash"])
    assert 1 <= near_distance <= 4, "the near copy must differ a little, within the default max distance"
    assert images["a-original.jpg"]["shard_id"] != images["c-near.jpg"]["shard_id"]

    assert result.kept_rows == 2
    assert result.kept_rows + result.error_rows == len(images)
    assert result.filtered_by_reason == {"duplicate_exact": 1, "near_duplicate": 1}
    assert result.errors_by_reason == {}
    assert result.dedup is not None
    assert (result.dedup["kept"], result.dedup["dropped_exact"], result.dedup["dropped_near"]) == (2, 1, 1)
    assert result.dedup["recomputed"] is True

    errors = {Path(r["input_ref"]).name: r for r in layout.read_errors("crawl").to_pylist()}
    assert {name: (e["category"], e["reason"]) for name, e in errors.items()} == {
        "b-copy.jpg": ("filtered", "duplicate_exact"),
        "c-near.jpg": ("filtered", "near_duplicate"),
    }
    original = images["a-original.jpg"]
    for name, error in errors.items():
        assert (error["stage"], error["transient"]) == ("crawl", False)
        assert error["item_id"] == images[name]["item_id"]
        assert error["shard_id"] == images[name]["shard_id"]
        assert original["source_ref"] in error["message"] and original["item_id"] in error["message"]
    assert f"pHash distance {near_distance}" in errors["c-near.jpg"]["message"]
    assert layout.dropped_item_ids() == {images["b-copy.jpg"]["item_id"], images["c-near.jpg"]["item_id"]}


def test_second_run_writes_nothing_and_reuses_the_dedup(first_run, image_folder):
    run_root, first = first_run
    before = files_of(run_root)
    again = crawl(image_folder, run_root)
    assert files_of(run_root) == before
    assert (again.computed_shards, again.skipped_shards) == (0, 2)
    assert again.dedup is not None
    assert again.dedup["recomputed"] is False
    assert again.dedup["fingerprint"] == first.dedup["fingerprint"]
    assert again.kept_rows == 2
    assert again.filtered_by_reason == first.filtered_by_reason


def test_changing_max_distance_recomputes_only_the_dedup(image_folder, tmp_path):
    run_root = tmp_path / "run"
    first = crawl(image_folder, run_root)
    shards_before = crawl_shard_files(run_root)
    strict = crawl(image_folder, run_root, "crawl.near_dup_max_distance=0")
    assert crawl_shard_files(run_root) == shards_before
    assert strict.computed_shards == 0
    assert strict.dedup is not None
    assert strict.dedup["recomputed"] is True
    assert strict.dedup["fingerprint"] != first.dedup["fingerprint"]
    assert (strict.kept_rows, strict.dedup["dropped_exact"], strict.dedup["dropped_near"]) == (3, 1, 0)
    assert strict.filtered_by_reason == {"duplicate_exact": 1}
    layout = RunLayout(Storage(str(run_root)))
    assert len(layout.dropped_item_ids()) == 1


def test_disabling_dedup_on_a_rerun_accounts_for_every_item_once(image_folder, tmp_path):
    run_root = tmp_path / "run"
    first = crawl(image_folder, run_root)
    assert first.kept_rows + first.error_rows == 4
    undeduped = crawl(image_folder, run_root, "crawl.dedup=false")
    assert undeduped.dedup is None
    assert undeduped.kept_rows + undeduped.error_rows == 4


def test_changing_the_wave_size_recomputes_only_the_dedup(image_folder, tmp_path):
    run_root = tmp_path / "run"
    first = crawl(image_folder, run_root)
    assert first.dedup is not None and first.dedup["waves_computed"] == 1
    shards_before = crawl_shard_files(run_root)
    per_shard = crawl(image_folder, run_root, "crawl.dedup_wave_shards=1")
    # The wave size is not part of the crawl stage's fingerprint: no crawl shard is redone.
    assert crawl_shard_files(run_root) == shards_before
    assert per_shard.computed_shards == 0
    assert per_shard.dedup is not None
    assert (per_shard.dedup["recomputed"], per_shard.dedup["waves_computed"]) == (True, 2)
    assert per_shard.dedup["fingerprint"] != first.dedup["fingerprint"]
    # The original (first shard) is its cluster's largest image, so one wave per shard drops the same rows.
    assert per_shard.filtered_by_reason == first.filtered_by_reason
    assert len(list((run_root / "crawl" / "_dedup" / "waves").iterdir())) == 2

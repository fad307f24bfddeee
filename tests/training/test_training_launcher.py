"""What both training launchers share: bad rows skipped and counted, one launch per run name, no silent restart."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.corpus import OutputShard, RowSlice, _manifest, write_output_shard
from ps3_engine.schemas.corpus import CORPUS_SCHEMA, MANIFEST_KEY
from ps3_engine.stages.corpus import CorpusConfig
from ps3_engine.training.common import skips
from ps3_engine.training.common.launcher import LaunchRefused, as_uri, claim_run, release
from ps3_engine.training.ps3.data import CorpusSampleTransform
from ps3_engine.training.ps3.recipes import load_recipe
from ps3_engine.training.ps3.tokenizer import build_tiny_text_tokenizer
from ps3_engine.training.ps3.train import launch
from tests.training.test_ps3_data import SCENES, _row

GOOD = [s for s in SCENES if s.split == "train"]


def _bad_rows() -> list[dict]:
    """One corpus row per kind of damage a training job must survive, each named in its image_id."""
    base = _row(GOOD[0])
    region = base["regions"][0]

    def with_region(image_id: str, **box) -> dict:
        regions = [{**region, "region_id": f"{image_id}-r0", **box}]
        return {**base, "image_id": image_id, "regions": regions, "global_caption": None}

    return [
        with_region("zero-width", x0=40, x1=40),
        with_region("zero-height", y0=30, y1=30),
        with_region("inverted", x0=100, x1=40),
        with_region("outside", x0=500, y0=500, x1=600, y1=600),
        {**with_region("empty-caption"), "regions": [{**region, "region_id": "e-r0", "caption": "  "}]},
        {**base, "image_id": "no-image", "image_bytes": None, "image_ref": None},
        {**base, "image_id": "undecodable", "image_bytes": b"not a jpeg"},
        {**base, "image_id": "wrong-size", "width": 999},
    ]


def write_damaged_corpus(root: Path) -> None:
    """The good training scenes plus every bad row, packed like the corpus builder packs them."""
    rows = [_row(s) for s in GOOD] + _bad_rows()
    storage = Storage(str(root))
    storage.write_parquet_atomic("corpus/part-0.parquet", pa.Table.from_pylist(rows, CORPUS_SCHEMA))
    plan = [OutputShard("train", 0, [RowSlice("corpus/part-0.parquet", tuple(range(len(rows))))])]
    written = [write_output_shard(storage, shard) for shard in plan]
    storage.write_json_atomic(MANIFEST_KEY, _manifest(written, "test", {}, CorpusConfig()))


@pytest.fixture(scope="module")
def damaged_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged-corpus")
    write_damaged_corpus(root)
    return root


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory) -> str:
    return str(build_tiny_text_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _recipe(tokenizer: str, **changes):
    return load_recipe("debug", {"tokenizer": tokenizer, "batch_size_per_worker": 2, "max_steps": 2, **changes})


EXPECTED_PS3 = {
    "skipped/no_caption": 5,  # zero-width, zero-height, inverted, outside, empty caption (no global caption)
    "skipped/no_image": 1,
    "skipped/undecodable_image": 1,
    "skipped/size_mismatch": 1,
    "dropped_regions/degenerate_box": 4,
    "dropped_regions/empty_caption": 1,
}


def test_every_bad_row_is_skipped_with_its_reason_in_process(text_tokenizer, monkeypatch):
    monkeypatch.setattr(skips, "_local", __import__("collections").Counter())
    transform = CorpusSampleTransform(image_size=56, tokenizer_path=text_tokenizer, context_length=16)
    samples = [s for row in _bad_rows() for s in transform.samples(row)]
    assert samples == []
    assert skips.local_totals() == {**EXPECTED_PS3, "skipped_rows": 8}


def test_a_good_row_keeps_its_usable_regions_and_drops_the_degenerate_one(text_tokenizer, monkeypatch):
    monkeypatch.setattr(skips, "_local", __import__("collections").Counter())
    row = _row(GOOD[0])
    row["regions"] = [*row["regions"], {**row["regions"][0], "region_id": "bad", "x1": row["regions"][0]["x0"]}]
    transform = CorpusSampleTransform(
        image_size=56, tokenizer_path=text_tokenizer, context_length=16, global_caption_prob=0.0
    )
    sample = transform(row)
    assert sample["gt_map"].sum() > 0
    assert skips.local_totals() == {"dropped_regions/degenerate_box": 1, "skipped_rows": 0}


@pytest.mark.slow
def test_ps3_trains_to_the_end_on_a_damaged_corpus_and_counts_the_skips(
    ray_local, damaged_corpus, text_tokenizer, tmp_path
):
    result = launch(str(damaged_corpus), _recipe(text_tokenizer), str(tmp_path / "store"), "damaged")
    assert result.steps == 2
    # Ray Data may read the corpus more than once (one pass per epoch): at least one pass is counted
    for key, per_pass in EXPECTED_PS3.items():
        assert result.metrics.get(key, 0) >= per_pass, (key, result.metrics)
    assert result.metrics["skipped_rows"] >= 8


@pytest.mark.slow
def test_vila_hd_trains_to_the_end_on_a_damaged_corpus_and_counts_the_skips(ray_local, damaged_corpus, tmp_path):
    from ps3_engine.training.vila_hd.recipes import load_recipe as load_vila_recipe
    from ps3_engine.training.vila_hd.tiny_tokenizer import build_tiny_chat_tokenizer
    from ps3_engine.training.vila_hd.train import launch as launch_vila

    tokenizer = str(build_tiny_chat_tokenizer(tmp_path / "chat-tokenizer"))
    recipe = load_vila_recipe("debug", {"tokenizer": tokenizer, "max_steps": 2, "batch_size_per_worker": 1})
    result = launch_vila(str(damaged_corpus), recipe, str(tmp_path / "store"), "damaged-vila")
    assert result.steps == 2
    assert result.metrics["skipped/no_image"] >= 1
    assert result.metrics["skipped/undecodable_image"] >= 1 and result.metrics["skipped/size_mismatch"] >= 1
    assert result.metrics["dropped_regions/degenerate_box"] >= 4
    assert result.metrics["dropped_regions/empty_caption"] >= 1


def test_a_second_launch_of_a_running_name_is_refused(ray_local, damaged_corpus, text_tokenizer, tmp_path):
    store = str(tmp_path / "store")
    running, _ = claim_run(store, "twin")  # what the first launch holds while it trains
    try:
        with pytest.raises(LaunchRefused, match="already training"):
            launch(str(damaged_corpus), _recipe(text_tokenizer), store, "twin")
        release(claim_run(store, "other-name")[0])  # another name on the same storage is a different run
    finally:
        release(running)
    release(claim_run(store, "twin")[0])  # the name is free again once the first launch is over


def _run_folder_with_checkpoint(store: Path, name: str) -> Path:
    checkpoint = store / name / "checkpoint_2026-11-30_22-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.pt").write_bytes(b"weights")
    return store / name


def test_checkpoints_without_their_snapshot_are_refused_before_anything_starts(
    damaged_corpus, text_tokenizer, tmp_path
):
    store = tmp_path / "store"
    run = _run_folder_with_checkpoint(store, "copied")
    with pytest.raises(LaunchRefused, match=r"checkpoint_manager_snapshot\.json is missing"):
        launch(str(damaged_corpus), _recipe(text_tokenizer), str(store), "copied")
    (run / "checkpoint_manager_snapshot.json").write_text("{trunc")
    with pytest.raises(LaunchRefused, match="unreadable"):
        launch(str(damaged_corpus), _recipe(text_tokenizer), str(store), "copied")
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint_2026-11-30_22-00-00.000000",
        "checkpoint_manager_snapshot.json",
    ]


def test_a_readable_snapshot_or_an_empty_run_folder_is_accepted():
    from ps3_engine.training.common.launcher import check_resumable

    def check(store: Path, name: str) -> None:
        check_resumable(str(store), name)

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        check(store, "fresh")
        run = _run_folder_with_checkpoint(store, "resumable")
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoints": []}))
        check(store, "resumable")


def test_s3_paths_are_printed_with_their_scheme():
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override="http://127.0.0.1:1", anonymous=True)
    assert as_uri("bucket/training/run/checkpoint_1", s3) == "s3://bucket/training/run/checkpoint_1"
    assert as_uri("/local/run/checkpoint_1", None) == "/local/run/checkpoint_1"

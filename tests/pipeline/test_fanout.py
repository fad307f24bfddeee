"""The same item reaching a later stage twice: every join keeps one row per image, whatever the input repeats.

A URL list naming one image three times once gave 140 caption rows for 110 image ids (caption joined the
boxes back to every crawl row with that image id) and a corpus with 28 rows for 22 images.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.conservation import check_run
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_build_corpus, run_caption, run_crawl, run_segment
from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.pipeline.verify import verify_run
from tests.stages.captioning.test_openai_backend import MODEL, fake_openai  # noqa: F401 - fixture used by name


def write_list(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(f"{url}\n" for url in urls))
    return path


SMALL = ["crawl.min_short_side=64", "crawl.min_long_side=64"]


def run_all(source: Path, run_root: Path, server, *overrides: str):
    config = load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.http.allow_private_addresses=true",
            "segment.top_k=3",
            "caption.backend=openai",
            f"caption.model={MODEL}",
            f"caption.openai.base_url={server.url}",
            "caption.openai.backoff_s=0",
            *overrides,
        ],
        run_root=str(run_root),
        sources=[str(source)],
    )
    results = [run(config) for run in (run_crawl, run_segment, run_caption, run_build_corpus)]
    return RunLayout(Storage(str(run_root))), results


def stage_rows(layout: RunLayout, stage: str) -> list[dict]:
    return [row for shard in sorted(layout.manifests(stage)) for row in layout.read_output(stage, shard).to_pylist()]


def assert_each_image_once(layout: RunLayout, num_images: int) -> None:
    regions = stage_rows(layout, "segment")
    captions = stage_rows(layout, "caption")
    corpus = stage_rows(layout, "corpus")
    assert len({r["image_id"] for r in regions}) == num_images
    assert Counter(r["region_id"] for r in regions).most_common(1)[0][1] == 1
    local = Counter(r["region_id"] for r in captions if r["kind"] == "local")
    assert sorted(local) == sorted(r["region_id"] for r in regions) and set(local.values()) == {1}
    global_ = Counter(r["image_id"] for r in captions if r["kind"] == "global")
    assert len(global_) == num_images and set(global_.values()) == {1}
    assert sorted(r["image_id"] for r in corpus) == sorted({r["image_id"] for r in regions})
    pairs = [(r["image_id"], box["region_id"]) for r in corpus for box in r["regions"]]
    assert len(pairs) == len(set(pairs))
    assert verify_run(layout) == [] and check_run(layout) == []


def test_one_url_three_times_is_captioned_once(zoo, tmp_path, fake_openai):  # noqa: F811
    """The issue's instance: one URL three times in a list (one shard, the crawl's dedup on)."""
    urls = [zoo.url("/good/0.jpg")] * 3 + [zoo.url("/good/1.jpg")]
    layout, results = run_all(write_list(tmp_path / "urls.txt", urls), tmp_path / "run", fake_openai)
    assert all(r.failed_shards == [] for r in results), [r.to_dict() for r in results]
    assert results[0].filtered_by_reason == {"duplicate_exact": 2}
    assert_each_image_once(layout, 2)


@pytest.fixture
def copies(tmp_path) -> Path:
    """Two small scenes, each stored three times under other names (same bytes, so one image id)."""
    folder = tmp_path / "copies"
    folder.mkdir()
    for seed in range(2):
        image, _ = planted_scene(320, 240, seed, num_patches=2)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        for copy in range(3):
            (folder / f"{copy}-scene-{seed}.jpg").write_bytes(buffer.getvalue())
    return folder


@pytest.mark.parametrize("shard_size", [6, 2])
def test_repeated_images_without_dedup_are_captioned_once(copies, tmp_path, fake_openai, shard_size):  # noqa: F811
    """Siblings: with crawl.dedup=false nothing drops the copies, inside one shard or across shards."""
    layout, results = run_all(
        copies, tmp_path / "run", fake_openai, "crawl.dedup=false", f"crawl.shard_size={shard_size}", *SMALL
    )
    assert all(r.failed_shards == [] for r in results), [r.to_dict() for r in results]
    assert results[0].kept_rows == 6  # the crawl itself keeps every fetched row
    assert_each_image_once(layout, 2)

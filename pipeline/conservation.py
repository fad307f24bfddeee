"""Conservation check (``ps3-engine status --check``): every item that entered a stage left it exactly once.

Per stage and shard, the items a stage was given are recomputed from its committed input, and each
must appear in the stage's output or in its errors table, and nothing may appear twice:

* crawl: planned items -> image rows + error rows (by ``item_id``);
* segment: kept images (crawl rows minus dedup drops, or minus repeated images when no dedup ran)
  -> images with regions + error rows, each image once;
* caption: regions (and one global request per image) -> caption rows + error rows; an image whose
  decode failed covers all its requests with one error row;
* corpus: images with regions -> corpus rows + error rows; the packed dataset holds each corpus row once.

A shard whose recorded input checksum is not the one its input gives now (the crawl shard was retried
or an earlier stage rerun; a crawl input was re-planned and not crawled yet) is not compared: it is
reported as ``stale`` (waiting for a rerun of its stage), as its items would differ from the new input's
without any being lost. The expected checksums come from the runner's own task builders, so the check
and a rerun agree on what is stale. Likewise a shard not computed yet because its upstream is new (more
sources crawled, a crawl shard committed before segment ran) is ``pending``, not a missing shard; one
whose files or index row show it was computed before, or that failed, stays ``missing_shard``
(:class:`~ps3_engine.pipeline.gaps.MissingShards`).
"""

from __future__ import annotations

from collections import Counter

from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.documents import check_documents
from ps3_engine.pipeline.gaps import Gap, MissingShards, read_planned, stale_gap
from ps3_engine.pipeline.gaps import compare_items as _compare
from ps3_engine.pipeline.gaps import read_column as _column
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import STAGE_SHARDS, caption_task, corpus_task, segment_task

__all__ = ["Gap", "check_run"]

_COMMAND = {shards: command for command, shards in STAGE_SHARDS.items()}  # "corpus" -> "build-corpus"


def _is_stale(stage: str, shard: str, recorded: str, current: str, gaps: list[Gap]) -> bool:
    """Whether a shard was computed from another input than its upstream gives now (then a stale gap)."""
    if recorded == current:
        return False
    gaps.append(stale_gap(stage, shard, _COMMAND[stage]))
    return True


def check_run(layout: RunLayout, global_captions: bool = True) -> list[Gap]:
    """All conservation gaps of a run (empty when every item is accounted for exactly once)."""
    gaps: list[Gap] = []
    missing = MissingShards(layout)
    crawl = layout.manifests("crawl")
    planned = sorted(o.key.rsplit("/", 1)[-1].removesuffix(".parquet") for o in layout.storage.list("crawl/_input/"))
    excluded = layout.excluded_items()  # dedup drops, or repeats of an image when no dedup ran
    kept_images: dict[str, set[str]] = {}
    for shard in planned:
        entry = crawl.get(shard)
        if entry is None:
            gaps.append(missing.gap("crawl", shard, "crawl"))
            continue
        expected, planned_checksum = read_planned(layout, RunLayout.crawl_input_key(shard))
        images = layout.storage.read_parquet(entry.output_key, columns=["item_id", "image_id"]).to_pylist()
        skipped = set(excluded.get(shard, ()))
        kept_images[shard] = {r["image_id"] for r in images if r["item_id"] not in skipped}
        # Re-planned (other sources) and not crawled again yet, e.g. a crawl stopped after its planning.
        if planned_checksum and _is_stale("crawl", shard, entry.input_checksum, planned_checksum, gaps):
            continue
        errors = _column(layout, entry.errors_key, "item_id")
        _compare("crawl", shard, expected, [r["item_id"] for r in images] + errors, gaps)

    segment = layout.manifests("segment")
    images_with_regions: dict[str, set[str]] = {}
    regions_of: dict[str, dict[str, list[str]]] = {}
    for shard, images in sorted(kept_images.items()):
        entry = segment.get(shard)
        if entry is None:
            if segment:
                gaps.append(missing.gap("segment", shard, "segment"))
            continue
        regions = layout.storage.read_parquet(entry.output_key, columns=["region_id", "image_id"]).to_pylist()
        by_image: dict[str, list[str]] = {}
        for row in regions:
            by_image.setdefault(row["image_id"], []).append(row["region_id"])
        # Still read when stale: the caption and corpus shards computed from this output are checked
        # against it (their own checksums say whether they are stale too).
        images_with_regions[shard] = set(by_image)
        regions_of[shard] = by_image
        task = segment_task(shard, crawl[shard], tuple(sorted(excluded.get(shard, ()))))
        if _is_stale("segment", shard, entry.input_checksum, task.input_checksum, gaps):
            continue
        region_counts = Counter(r["region_id"] for r in regions)
        duplicated = sorted(k for k, n in region_counts.items() if n > 1)
        if duplicated:
            gaps.append(Gap("segment", shard, "duplicated", len(duplicated), tuple(duplicated[:5])))
        _compare("segment", shard, images, list(by_image) + _column(layout, entry.errors_key, "item_id"), gaps)

    caption = layout.manifests("caption")
    for shard, by_image in sorted(regions_of.items()):
        entry = caption.get(shard)
        if entry is None:
            if caption:
                gaps.append(missing.gap("caption", shard, "caption"))
            continue
        current = caption_task(shard, segment[shard], crawl[shard]).input_checksum
        if _is_stale("caption", shard, entry.input_checksum, current, gaps):
            continue
        rows = layout.storage.read_parquet(entry.output_key, columns=["image_id", "region_id", "kind"]).to_pylist()
        errors = set(_column(layout, entry.errors_key, "item_id"))
        error_list = _column(layout, entry.errors_key, "item_id")
        expected: set[str] = set()
        for image_id, region_ids in by_image.items():
            if image_id in errors:  # the image itself failed (e.g. undecodable): one row covers it
                continue
            expected.update(region_ids)
            if global_captions:
                expected.add(f"{image_id}:global")
        seen = [r["region_id"] if r["kind"] == "local" else f"{r['image_id']}:global" for r in rows]
        seen += [e for e in error_list if e not in by_image]
        _compare("caption", shard, expected, seen, gaps)

    corpus = layout.manifests("corpus")
    # Every corpus shard counts towards the dataset (image shards and rendered-document shards).
    corpus_rows = sum(entry.output_rows for entry in corpus.values())
    for shard, images in sorted(images_with_regions.items()):
        entry = corpus.get(shard)
        if entry is None:
            if corpus:
                gaps.append(missing.gap("corpus", shard, "build-corpus"))
            continue
        if shard in caption:  # without its caption shard a corpus shard is compared as it is
            current = corpus_task(shard, caption[shard], segment[shard], crawl[shard]).input_checksum
            if _is_stale("corpus", shard, entry.input_checksum, current, gaps):
                continue
        seen = _column(layout, entry.output_key, "image_id") + _column(layout, entry.errors_key, "item_id")
        _compare("corpus", shard, images, seen, gaps)

    gaps += check_documents(layout, missing)
    if layout.storage.exists(DATASET_MANIFEST_KEY):
        manifest = layout.storage.read_json(DATASET_MANIFEST_KEY)
        ids: list[str] = []
        for shard in manifest["shards"]:
            ids += _column(layout, shard["key"], "image_id")
        counted = sum(split["images"] for split in manifest["counts"].values())
        duplicated = sorted(k for k, n in Counter(ids).items() if n > 1)
        if duplicated:
            gaps.append(Gap("dataset", "-", "duplicated", len(duplicated), tuple(duplicated[:5])))
        listed = {s["key"] for s in manifest["shards"]} | {s["pairs_key"] for s in manifest["shards"]}
        strays = sorted(
            o.key for o in layout.storage.list("dataset/") if o.key.endswith(".parquet") and o.key not in listed
        )
        if strays:  # files of an unfinished or crashed rebuild: a glob of the folders would read them
            gaps.append(Gap("dataset", "-", "unexpected", len(strays), tuple(strays[:5])))
        if not (len(ids) == counted == corpus_rows):
            gaps.append(
                Gap(
                    "dataset",
                    "-",
                    "dataset_mismatch",
                    abs(len(ids) - corpus_rows),
                    (f"shards hold {len(ids)}, manifest says {counted}, corpus stage has {corpus_rows}",),
                )
            )
    return gaps

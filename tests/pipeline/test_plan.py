"""``ps3-engine plan`` shows every shard a run holds, also those of sources the given config does not list."""

from __future__ import annotations

import json

from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.plan import plan_run


def test_plan_without_document_sources_still_shows_the_runs_render_shards(rerun_run, capsys):
    """Before, a config with image sources only (e.g. configs/local.yaml) planned no render line and left
    the pages' corpus shard out of build-corpus, though build-corpus still builds its rows."""
    images_only = rerun_run.config(documents=False)
    plans = {p.stage: p for p in plan_run(images_only)}
    assert list(plans) == ["crawl", "segment", "caption", "render", "build-corpus"]
    assert (plans["render"].shards, plans["render"].recompute) == (1, {})
    assert "PDF sources this config lacks: kept as they are" in plans["render"].note
    assert plans["build-corpus"].shards == 3 and not plans["build-corpus"].recompute
    # What a run with that config does to them: the pages' rows follow a change of their own settings.
    changed = images_only.model_copy(
        update={"document_corpus": images_only.document_corpus.model_copy(update={"max_regions_per_page": 3})}
    )
    plans = {p.stage: p for p in plan_run(changed)}
    assert not plans["render"].recompute and plans["build-corpus"].reasons == {"config changed": 1}
    # --force segment leaves the pages alone, --force render does not touch the images' rows.
    plans = {p.stage: p for p in plan_run(rerun_run.config(), force=frozenset({"segment"}))}
    assert plans["build-corpus"].reasons == {"forced": 2} and not plans["render"].recompute
    plans = {p.stage: p for p in plan_run(rerun_run.config(), force=frozenset({"render"}))}
    assert plans["build-corpus"].reasons == {"forced": 1} and plans["render"].reasons == {"forced": 1}
    assert not plans["caption"].recompute


def test_plan_with_other_image_sources_counts_the_runs_crawl_shards(rerun_run, zoo, tmp_path, capsys):
    """The image branch's sibling: crawl shards of sources the config does not list are not crawled again,
    but their images go on through segment, caption and build-corpus, so plan counts them there."""
    urls = tmp_path / "more.txt"
    urls.write_text(f"{zoo.url('/good/3.jpg')}\n")
    capsys.readouterr()
    argv = ["plan", "--run-root", str(rerun_run.root), "--input", str(urls), "--json"]
    assert main(argv) == 0
    plans = json.loads(capsys.readouterr().out)
    assert plans["crawl"]["shards"] == 3 and set(plans["crawl"]["recompute"].values()) == {"missing"}
    assert "2 crawl shards of sources this config does not list" in plans["crawl"]["note"]
    assert plans["segment"]["shards"] == 3 and set(plans["segment"]["recompute"].values()) == {
        "upstream shard recomputes"
    }
    assert plans["build-corpus"]["shards"] == 3 + 1
    assert main(["plan", "--run-root", str(rerun_run.root), "--input", str(urls)]) == 0
    out = capsys.readouterr().out
    assert "  crawl         1 of 3 shards to compute {'missing': 1} (2 crawl shards of sources" in out

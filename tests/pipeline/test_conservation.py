"""``status --check`` tells shards waiting for a rerun (their upstream changed) from items really lost."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.conservation import check_run
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_pipeline


def test_shards_waiting_for_a_rerun_after_retry_failed_are_stale_not_lost(rerun_run, zoo, tmp_path, capsys):
    """Before, the check right after ``crawl --retry-failed`` called the retried image "lost" in segment,
    caption and corpus: their shards were computed from the crawl shard as it was before the retry."""
    root = rerun_run.copy_run(tmp_path / "run")
    zoo.healed = True
    try:
        assert main(["crawl", "--retry-failed", str(root), "--set", "executor.kind=local"]) == 0
    finally:
        zoo.healed = False
    layout = RunLayout(Storage(str(root)))
    (retried,) = [s for s, e in layout.manifests("crawl").items() if e.attempt == 2]
    gaps = check_run(layout)
    assert {(g.stage, g.shard_id, g.problem) for g in gaps} == {
        ("segment", retried, "stale"),
        ("caption", retried, "stale"),
        ("corpus", retried, "stale"),
    }
    capsys.readouterr()
    assert main(["status", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert "lost" not in out and "GAP" not in out
    assert f"STALE segment/{retried}: its input changed since it was computed; rerun segment" in out
    assert f"STALE corpus/{retried}: its input changed since it was computed; rerun build-corpus" in out
    assert out.strip().splitlines()[-1] == (
        f"conservation check of {root}: OK; 3 stale shards not checked (rerun segment, caption, build-corpus)"
    )

    # The rerun computes exactly those shards, and the check is clean again.
    results = {r.stage: r.computed_shards for r in run_pipeline(rerun_run.config(root))}
    assert results == {"crawl": 0, "segment": 1, "caption": 1, "render": 0, "build-corpus": 1}
    assert check_run(layout) == []


def test_an_item_lost_from_a_fresh_shard_is_still_lost(rerun_run, tmp_path, capsys):
    """A sibling guard: a shard whose input is unchanged keeps the item comparison (lost stays lost)."""
    root = rerun_run.copy_run(tmp_path / "run")
    layout = RunLayout(Storage(str(root)))
    entry = next(e for e in layout.manifests("corpus").values() if e.output_rows and not e.shard_id.startswith("doc-"))
    rows = pq.read_table(root / entry.output_key)
    pq.write_table(rows.slice(1), root / entry.output_key)
    problems = {(g.stage, g.problem) for g in check_run(layout)}
    assert ("corpus", "lost") in problems and not any(p == "stale" for _, p in problems)
    assert main(["status", str(root), "--check"]) == 1
    assert f"GAP corpus/{entry.shard_id}: 1 lost" in capsys.readouterr().out


def test_a_page_corpus_shard_after_render_changed_is_stale(rerun_run, tmp_path, capsys):
    """The document branch's sibling: a render shard rerendered at another dpi leaves its pages' corpus
    shard stale (its boxes are in the old pixels), which the check must say rather than compare it."""
    from ps3_engine.pipeline.runner import run_render

    root = rerun_run.copy_run(tmp_path / "run")
    assert run_render(rerun_run.config(root, "render.dpi=100")).computed_shards == 1
    layout = RunLayout(Storage(str(root)))
    (shard,) = layout.manifests("render")
    assert [(g.stage, g.shard_id, g.problem) for g in check_run(layout)] == [("corpus", shard, "stale")]
    capsys.readouterr()
    assert main(["status", str(root), "--check"]) == 0
    assert f"STALE corpus/{shard}: its input changed since it was computed; rerun build-corpus" in (
        capsys.readouterr().out
    )


def test_a_shard_whose_upstream_is_new_is_pending_and_one_computed_before_is_still_missing(
    rerun_run, zoo, tmp_path, capsys
):
    """Before, after crawling one more source the check called the new crawl shard's segment shard a
    missing shard and failed: it is not computed yet, waiting for a rerun of segment like a stale one.
    A shard computed before and gone, or one that failed, still fails the check."""
    from ps3_engine.pipeline.runner import run_crawl, run_segment

    root = rerun_run.copy_run(tmp_path / "run")
    more = tmp_path / "more.txt"
    more.write_text(f"{zoo.url('/good/3.jpg')}\n")
    config = rerun_run.config(root).model_copy(update={"sources": [str(rerun_run.urls), str(more)]})
    layout = RunLayout(Storage(str(root)))
    first, second = sorted(layout.manifests("crawl"))
    assert run_crawl(config).computed_shards == 1
    (new,) = set(layout.manifests("crawl")) - {first, second}
    assert [(g.stage, g.shard_id, g.problem) for g in check_run(layout)] == [("segment", new, "pending")]
    capsys.readouterr()
    assert main(["status", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert f"PENDING segment/{new}: not computed yet; rerun segment" in out and "GAP" not in out
    assert out.strip().splitlines()[-1] == f"conservation check of {root}: OK; 1 shard not computed yet (rerun segment)"

    assert run_segment(config).computed_shards == 1
    assert {(g.stage, g.shard_id, g.problem) for g in check_run(layout)} == {
        ("caption", new, "pending"),
        ("corpus", new, "pending"),
    }
    # Genuinely broken: a segment shard gone with its files (the stage's index folded it), a caption
    # shard whose manifest vanished (its files remain), the new shard's caption failed in its last run.
    for key in ("manifest_key", "output_key", "errors_key"):
        (root / getattr(RunLayout, key)("segment", first)).unlink()
    (root / RunLayout.manifest_key("caption", second)).unlink()
    summary = json.loads((root / "summary.json").read_text())
    summary["failed_shards"].append({"stage": "caption", "shard_id": new, "message": "out of memory"})
    (root / "summary.json").write_text(json.dumps(summary))
    assert {(g.stage, g.shard_id, g.problem) for g in check_run(layout)} == {
        ("segment", first, "missing_shard"),
        ("caption", second, "missing_shard"),
        ("caption", new, "missing_shard"),
        ("corpus", new, "pending"),
    }
    capsys.readouterr()
    assert main(["status", str(root), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"GAP segment/{first}: 1 missing_shard" in out and f"PENDING corpus/{new}" in out
    assert out.strip().splitlines()[-1] == (
        f"conservation check of {root}: 3 gaps; 1 shard not computed yet (rerun build-corpus)"
    )

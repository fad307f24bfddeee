"""The runner's reruns: what ``crawl --retry-failed`` leaves in the summary, what ``--force`` recomputes."""

from __future__ import annotations

import json

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.layout import RunLayout
from tests.support.zoo import ZOO_CRAWL_OVERRIDES


def test_retry_failed_with_nothing_to_retry_says_so_and_keeps_the_summary(zoo, tmp_path, capsys):
    """Before, it replaced the summary's crawl entry with one of 0 planned shards and 0 items/s."""
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{zoo.url(p)}\n" for p in ("/good/0.jpg", "/small.jpg", "/missing.jpg")))
    root = tmp_path / "run"
    sets = [a for o in [*ZOO_CRAWL_OVERRIDES, "executor.progress=false"] for a in ("--set", o)]
    assert main(["crawl", "--run-root", str(root), "--input", str(urls), "--executor", "local", *sets]) == 0
    summary = (root / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["crawl", "--retry-failed", str(root), "--set", "executor.kind=local"]) == 0  # 404: permanent
    assert capsys.readouterr().out.splitlines() == [
        f"[crawl] nothing to retry: {root} records no transient failure (5xx, 429, timeouts)"
    ]
    assert (root / "summary.json").read_bytes() == summary


def test_retry_failed_summary_counts_every_crawl_shard(rerun_run, zoo, tmp_path, capsys):
    """A retry that does recrawl: the summary still covers the whole crawl (before: only the retried
    shard, "of 1"), its other shards counted as already done, as after a plain rerun."""
    root = rerun_run.copy_run(tmp_path / "run")
    before = json.loads((root / "summary.json").read_text())["stages"]
    zoo.healed = True
    try:
        capsys.readouterr()
        assert main(["crawl", "--retry-failed", str(root), "--set", "executor.kind=local"]) == 0
    finally:
        zoo.healed = False
    assert "[crawl] shards: 1 computed, 1 already done, 0 failed (of 2)" in capsys.readouterr().out
    after = json.loads((root / "summary.json").read_text())["stages"]
    crawl = after["crawl"]
    assert (crawl["planned_shards"], crawl["computed_shards"], crawl["skipped_shards"]) == (2, 1, 1)
    assert crawl["kept_rows"] == before["crawl"]["kept_rows"] + 1 and crawl["errors_by_reason"] == {}
    assert {k: v for k, v in after.items() if k != "crawl"} == {k: v for k, v in before.items() if k != "crawl"}
    assert len(RunLayout(Storage(str(root))).manifests("crawl")) == 2


def _corpus_commits(layout: RunLayout) -> dict[str, str]:
    return {shard: str(entry.created_at) for shard, entry in layout.manifests("corpus").items()}


def test_force_recomputes_the_forced_stage_and_after_it_only_for_the_items_that_go_through_it(rerun_run, tmp_path):
    """``run --force segment`` recomputed the rendered pages' corpus rows too, which do not come from
    segment (README: "--force STAGE recomputes a stage and the ones after it"); ``--force render``
    recomputed the images' corpus rows. Now each forces its own branch; build-corpus forces both."""
    from ps3_engine.pipeline.runner import run_pipeline

    root = rerun_run.copy_run(tmp_path / "run")
    config = rerun_run.config(root)
    layout = RunLayout(Storage(str(root)))
    pages = {s for s in layout.manifests("corpus") if s.startswith("doc-")}
    images = set(layout.manifests("corpus")) - pages
    assert len(pages) == 1 and len(images) == 2

    def forced(*stages: str) -> tuple[dict[str, int], set[str]]:
        before = _corpus_commits(layout)
        results = {r.stage: r.computed_shards for r in run_pipeline(config, force=frozenset(stages))}
        after = _corpus_commits(layout)
        return results, {shard for shard in after if after[shard] != before.get(shard)}

    computed, recommitted = forced("segment")
    assert computed == {"crawl": 0, "segment": 2, "caption": 2, "render": 0, "build-corpus": 2}
    assert recommitted == images
    computed, recommitted = forced("render")
    assert computed == {"crawl": 0, "segment": 0, "caption": 0, "render": 1, "build-corpus": 1}
    assert recommitted == pages
    computed, recommitted = forced("build-corpus")
    assert computed == {"crawl": 0, "segment": 0, "caption": 0, "render": 0, "build-corpus": 3}
    assert recommitted == images | pages


def test_a_rerun_that_computes_nothing_keeps_the_figures_of_the_computation(rerun_run, tmp_path):
    """Before, ``ps3-engine segment`` with every shard done replaced segment's wall time, items/s and busy
    fraction in summary.json with those of its skip check (near zero), and ``report`` showed them."""
    from ps3_engine.pipeline.report import stage_table
    from ps3_engine.pipeline.runner import COMPUTATION_FIELDS, run_build_corpus, run_crawl, run_segment

    root = rerun_run.copy_run(tmp_path / "run")
    config = rerun_run.config(root)
    before = json.loads((root / "summary.json").read_text())
    assert before["stages"]["segment"]["computed_shards"] == 2 and before["stages"]["segment"]["wall_s"] > 0
    for run in (run_crawl, run_segment, run_build_corpus):
        assert run(config).computed_shards == 0
    after = json.loads((root / "summary.json").read_text())
    for stage in ("crawl", "segment", "build-corpus"):
        old, new = before["stages"][stage], after["stages"][stage]
        assert {k: new[k] for k in COMPUTATION_FIELDS} == {k: old[k] for k in COMPUTATION_FIELDS}, stage
        assert new["noop_rerun_at"] > before["written_at"] and "noop_rerun_at" not in old
        # The rows and errors are this run's (the same); dedup and dataset say what this run did.
        assert {k: v for k, v in new.items() if k not in ("noop_rerun_at", "dedup", "dataset")} == {
            k: v for k, v in old.items() if k not in ("dedup", "dataset")
        }, stage
    assert after["stages"]["crawl"]["dedup"]["kept"] == before["stages"]["crawl"]["dedup"]["kept"]
    assert after["stages"]["build-corpus"]["dataset"]["rebuilt"] is False
    assert after["stages"]["build-corpus"]["dataset"]["counts"] == before["stages"]["build-corpus"]["dataset"]["counts"]
    assert after["stages"]["caption"] == before["stages"]["caption"]
    assert stage_table(after) == stage_table(before)

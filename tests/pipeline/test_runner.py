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

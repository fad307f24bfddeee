"""benchmarks/scale_state.py end to end at a tiny size: a synthetic finished run on SeaweedFS, status and plan."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.scale_state import measure, table


@pytest.mark.slow
def test_status_and_plan_figures_on_a_tiny_synthetic_run(s3_server):
    result = measure(s3_server, 3_000, argparse.Namespace(unindexed_size=3_000))
    shards = result["shards"]
    assert result["status"]["outcome"] == dict.fromkeys(
        ("crawl", "segment", "caption", "build-corpus"), f"done {shards}/{shards}"
    )
    assert set(result["plan"]["outcome"].values()) == {f"0 of {shards} to compute"}
    # Per stage: the index manifest, its part and the one manifest left out of it (the newest), plus run.json;
    # and the crawl inputs written in the same second as their shard's commit (a tiny run writes them at once).
    assert result["status"]["calls"]["read_bytes"] <= 1 + 4 * 3 + shards
    assert result["status-unindexed"]["calls"]["read_bytes"] >= 4 * shards
    assert f"| {3_000:,} | {shards:,} | status |" in table([result])

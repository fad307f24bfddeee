"""Reruns compute exactly what is missing or stale, and converge to the rows of a clean run."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.conservation import check_run
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl
from ps3_engine.pipeline.status import run_status
from ps3_engine.pipeline.verify import verify_run


@pytest.fixture
def image_folder(zoo, tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("/good/0.jpg", "/good/1.jpg", "/good/2.jpg", "/good/3.jpg", "/small.jpg", "/truncated.jpg"):
        (folder / name.replace("/", "_").lstrip("_")).write_bytes(zoo.assets[name])
    return folder


def config_for(folder: Path, run_root: Path, *overrides: str):
    return load_run_config(
        None,
        ["executor.kind=local", "executor.progress=false", "crawl.shard_size=2", *overrides],
        run_root=str(run_root),
        sources=[str(folder)],
    )


def rows(run_root: Path) -> pl.DataFrame:
    return pl.read_parquet(str(run_root / "crawl" / "part-*.parquet")).drop("fetched_at").sort("item_id")


def test_lost_manifest_recomputes_only_that_shard(image_folder, tmp_path):
    run_root = tmp_path / "run"
    first = run_crawl(config_for(image_folder, run_root))
    assert (first.computed_shards, first.kept_rows) == (3, 4)
    clean = rows(run_root)
    layout = RunLayout(Storage(str(run_root)))
    shard = sorted(layout.manifests("crawl"))[1]
    # A crash after the data files were written but before the manifest: the shard does not count.
    Path(run_root, layout.manifest_key("crawl", shard)).unlink()
    Path(run_root, "_tmp", "leftover", "crawl").mkdir(parents=True)
    Path(run_root, "_tmp", "leftover", "crawl", f"part-{shard}.parquet").write_bytes(b"partial")
    again = run_crawl(config_for(image_folder, run_root))
    assert (again.computed_shards, again.skipped_shards) == (1, 2)
    assert rows(run_root).equals(clean)
    assert again.kept_rows == 4 and again.filtered_by_reason == {"too_small": 1}
    assert again.errors_by_reason == {"truncated": 1}


def test_semantic_config_change_makes_shards_stale_operational_does_not(image_folder, tmp_path):
    run_root = tmp_path / "run"
    run_crawl(config_for(image_folder, run_root))
    tuned = run_crawl(config_for(image_folder, run_root, "crawl.download_threads=3", "crawl.http.max_retries=7"))
    assert tuned.computed_shards == 0
    stricter = run_crawl(config_for(image_folder, run_root, "crawl.min_short_side=2000"))
    assert stricter.computed_shards == 3
    assert stricter.kept_rows == 0 and stricter.filtered_by_reason == {"too_small": 5}
    snapshot = Storage(str(run_root)).read_json("run.json")
    assert snapshot["config"]["crawl"]["min_short_side"] == 2000


def test_reference_storage_keeps_no_bytes(image_folder, tmp_path):
    run_root = tmp_path / "run"
    run_crawl(config_for(image_folder, run_root, "crawl.image_storage=reference"))
    frame = rows(run_root)
    assert frame["image_bytes"].null_count() == frame.height == 4
    assert all(Path(ref).exists() for ref in frame["image_ref"].to_list())


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_output_is_recomputed_not_trusted(image_folder, tmp_path, caplog):
    """A finished crawl part cut to half its size: the rerun names it and recomputes exactly that shard."""
    run_root = tmp_path / "run"
    run_crawl(config_for(image_folder, run_root))
    clean = rows(run_root)
    layout = RunLayout(Storage(str(run_root)))
    shard = sorted(layout.manifests("crawl"))[0]
    damaged = run_root / layout.output_key("crawl", shard)
    _truncate(damaged)
    (problem,) = verify_run(layout)
    assert problem.examples[0].startswith(f"{damaged} is {damaged.stat().st_size} bytes but its manifest recorded")
    caplog.set_level(logging.WARNING)
    again = run_crawl(config_for(image_folder, run_root))
    assert (again.computed_shards, again.skipped_shards) == (1, 2)
    assert f"crawl shard {shard} is damaged: {damaged} is" in caplog.text
    assert rows(run_root).equals(clean)
    assert verify_run(layout) == [] and check_run(layout) == []


@pytest.mark.parametrize("which", ["manifest", "errors"])
def test_truncated_manifest_or_errors_file_is_recomputed(image_folder, tmp_path, caplog, which):
    run_root = tmp_path / "run"
    run_crawl(config_for(image_folder, run_root))
    layout = RunLayout(Storage(str(run_root)))
    shard = sorted(layout.manifests("crawl"))[2]
    key = layout.manifest_key("crawl", shard) if which == "manifest" else layout.errors_key("crawl", shard)
    _truncate(run_root / key)
    (problem,) = verify_run(layout)
    assert str(run_root / key) in problem.examples[0]
    crawl_status = run_status(str(run_root))["stages"]["crawl"]  # status still answers, and counts it
    assert (crawl_status.done, crawl_status.missing) == (2, 1)
    caplog.set_level(logging.WARNING)
    again = run_crawl(config_for(image_folder, run_root))
    assert (again.computed_shards, again.skipped_shards) == (1, 2)
    assert str(run_root / key) in caplog.text
    assert again.errors_by_reason == {"truncated": 1} and again.filtered_by_reason == {"too_small": 1}
    assert verify_run(layout) == [] and check_run(layout) == []


def test_status_check_names_a_damaged_file_and_fails(image_folder, tmp_path, capsys):
    """A sibling: a part rewritten with other bytes of the same size passes the cheap size check of a
    rerun but not ``status --check``'s checksums."""
    run_root = tmp_path / "run"
    run_crawl(config_for(image_folder, run_root))
    layout = RunLayout(Storage(str(run_root)))
    shard = sorted(layout.manifests("crawl"))[1]
    part = run_root / layout.output_key("crawl", shard)
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert main(["status", str(run_root), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {part} does not match the sha256 its manifest recorded" in out
    assert main(["status", str(run_root), "--check"]) == 1


def test_damage_is_found_on_s3_too(s3_bucket, s3_server):
    """The cheap rerun check on S3: one metadata request per file, sizes against the manifest."""
    import pyarrow as pa

    from ps3_engine.pipeline.layout import ShardTask
    from ps3_engine.schemas import ERROR_SCHEMA

    layout = RunLayout(Storage(f"s3://{s3_bucket}/run#1"))
    task = ShardTask("crawl", "0001", "crawl/_input/0001.parquet", "c", ())
    output = pa.table({"x": list(range(500))})
    entry = layout.commit_shard(
        task, fingerprint="f", output=output, errors=ERROR_SCHEMA.empty_table(), attempt=1, wall_seconds=0.0
    )
    assert layout.shard_state(task, "f", entry) == "done"
    data = layout.storage.read_bytes(entry.output_key)
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"run#1/{entry.output_key}", Body=data[:100])
    assert layout.shard_state(task, "f", entry) == "damaged"
    assert layout.damage(entry) == (
        "damaged",
        f"s3://{s3_bucket}/run#1/crawl/part-0001.parquet is 100 bytes but its manifest recorded {len(data)}",
    )

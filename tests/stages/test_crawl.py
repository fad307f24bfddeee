"""The crawl stage end to end: a real loopback HTTP zoo, local Ray, local folder and real S3 run roots."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl
from tests.support.zoo import CREDENTIAL_SECRET, ZOO_CRAWL_OVERRIDES, ZOO_EXPECTED

VOLATILE_IMAGE_COLUMNS = ["fetched_at"]


def zoo_config(run_root: str, url_list: Path, executor: str = "ray", extra: tuple[str, ...] = ()):
    return load_run_config(
        None,
        [*ZOO_CRAWL_OVERRIDES, f"executor.kind={executor}", "executor.progress=false", *extra],
        run_root=run_root,
        sources=[str(url_list)],
    )


@pytest.fixture(scope="module")
def url_list(zoo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lists") / "zoo.txt"
    path.write_text("# the crawl zoo\n" + "\n".join(zoo.urls()) + "\n")
    return path


def outcomes(layout: RunLayout, zoo) -> dict[str, tuple[str, str]]:
    """path -> (category, reason) read back from the run root, each item exactly once."""
    found: dict[str, tuple[str, str]] = {}
    dropped = layout.dropped_item_ids()
    for shard in layout.manifests("crawl"):
        for row in layout.read_output("crawl", shard, columns=["item_id", "source_ref"]).to_pylist():
            if row["item_id"] not in dropped:
                assert zoo.path_of(row["source_ref"]) not in found
                found[zoo.path_of(row["source_ref"])] = ("kept", "")
    for row in layout.read_errors("crawl").to_pylist():
        path = zoo.path_of(row["input_ref"])
        assert path not in found, f"{path} is both {found[path]} and an error {row['reason']}"
        found[path] = (row["category"], row["reason"])
    return found


@pytest.fixture(scope="module")
def local_run(zoo, url_list, ray_local, tmp_path_factory):
    zoo.reset()
    run_root = str(tmp_path_factory.mktemp("run-local"))
    result = run_crawl(zoo_config(run_root, url_list))
    return run_root, result


def test_zoo_outcomes_are_exact(local_run, zoo):
    run_root, result = local_run
    layout = RunLayout(Storage(run_root))
    assert outcomes(layout, zoo) == ZOO_EXPECTED
    expected = Counter(category for category, _ in ZOO_EXPECTED.values())
    assert result.kept_rows == expected["kept"] == 16
    assert sum(result.filtered_by_reason.values()) == expected["filtered"] == 5
    assert sum(result.errors_by_reason.values()) == expected["failed"] == 18
    assert result.failed_shards == []
    assert result.computed_shards == result.planned_shards == 5
    summary = json.loads(Path(run_root, "summary.json").read_text())
    assert summary["stages"]["crawl"]["errors_by_reason"]["http_404"] == 1
    assert summary["stages"]["crawl"]["filtered_by_reason"]["duplicate_exact"] == 1


def test_kept_rows_carry_orientation_modes_and_provenance(local_run, zoo):
    run_root, _ = local_run
    table = pads.dataset(sorted(str(p) for p in Path(run_root, "crawl").glob("part-*.parquet"))).to_table()
    rows = {zoo.path_of(r["source_ref"]): r for r in table.to_pylist()}
    assert (rows["/good/rotated.jpg"]["width"], rows["/good/rotated.jpg"]["height"]) == (1536, 2048)
    assert rows["/good/rotated.jpg"]["exif_orientation"] == 6
    assert rows["/good/cmyk.jpg"]["mode"] == "CMYK"
    assert rows["/good/gray16.png"]["mode"].startswith("I")
    assert rows["/good/palette.png"]["mode"] == "P"
    assert rows["/good/flaky-503.jpg"]["fetch_attempts"] == 2
    assert rows["/good/flaky-429.jpg"]["fetch_attempts"] == 2
    assert rows["/redirect-to-good"]["final_url"] == zoo.url("/good/redirect-target.jpg")
    assert rows["/creds.jpg"]["source_ref"] == rows["/creds.jpg"]["final_url"] == zoo.url("/creds.jpg")
    good = rows["/good/0.jpg"]
    assert good["image_bytes"] == zoo.assets["/good/0.jpg"]
    assert good["image_id"] == good["sha256"] and len(good["sha256"]) == 64
    assert (good["width"], good["height"], good["format"]) == (2048, 1536, "JPEG")


def test_url_credentials_are_never_sent_stored_or_logged(zoo, url_list, ray_local, tmp_path, caplog):
    """``http://user:secret@host/x.jpg``: the secret appears in no run file (inputs, parts, errors) and no log."""
    assert CREDENTIAL_SECRET in url_list.read_text()
    zoo.reset()
    run_root = Path(tmp_path / "run")
    with caplog.at_level(logging.DEBUG):
        result = run_crawl(zoo_config(str(run_root), url_list, executor="local"))
    assert result.failed_shards == []
    files = [p for p in run_root.rglob("*") if p.is_file()]
    assert any("_input" in p.parts for p in files) and any(p.name.startswith("part-") for p in files)
    assert [p for p in files if CREDENTIAL_SECRET.encode() in p.read_bytes()] == []
    assert CREDENTIAL_SECRET not in caplog.text
    assert zoo.authorization_headers == []


def test_metadata_redirect_is_a_permanent_block_without_a_connection(local_run, zoo):
    run_root, _ = local_run
    [row] = [
        r for r in RunLayout(Storage(run_root)).read_errors("crawl").to_pylist() if r["input_ref"].endswith("-metadata")
    ]
    assert (row["reason"], row["transient"], row["attempts"]) == ("blocked_address", False, 1)
    assert "169.254.169.254" in row["message"] and "allow_link_local_addresses" in row["message"]


def test_every_input_item_leaves_exactly_once(local_run):
    run_root, _ = local_run
    layout = RunLayout(Storage(run_root))
    inputs = [
        i
        for obj in layout.storage.list("crawl/_input/")
        for i in layout.storage.read_parquet(obj.key).column("item_id").to_pylist()
    ]
    outputs = [
        i for s in layout.manifests("crawl") for i in layout.read_output("crawl", s).column("item_id").to_pylist()
    ]
    shard_errors = [
        i for s in layout.manifests("crawl") for i in layout.read_shard_errors("crawl", s).column("item_id").to_pylist()
    ]
    assert len(inputs) == len(set(inputs)) == len(ZOO_EXPECTED)
    assert sorted(outputs + shard_errors) == sorted(inputs)
    assert layout.dropped_item_ids() <= set(outputs)
    # The Ray run too: the listed credentials reached no file (inputs, parts, errors, summary, logs).
    assert not [p for p in Path(run_root).rglob("*") if p.is_file() and CREDENTIAL_SECRET.encode() in p.read_bytes()]


def test_second_run_writes_nothing_and_fetches_nothing(local_run, zoo, url_list):
    run_root, _ = local_run
    before = {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in Path(run_root).rglob("*")
        if p.is_file() and p.name != "summary.json"
    }
    requests_before = sum(zoo.requests.values())
    again = run_crawl(zoo_config(run_root, url_list))
    after = {
        p: (p.stat().st_mtime_ns, p.read_bytes())
        for p in Path(run_root).rglob("*")
        if p.is_file() and p.name != "summary.json"
    }
    assert again.computed_shards == 0 and again.skipped_shards == 5
    assert after == before
    assert sum(zoo.requests.values()) == requests_before
    assert again.kept_rows == 16


def _comparable_images(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop(VOLATILE_IMAGE_COLUMNS).sort("item_id")


def _comparable_errors(table: pa.Table) -> list[tuple]:
    return sorted((r["item_id"], r["category"], r["reason"], r["transient"]) for r in table.to_pylist())


def test_s3_run_root_matches_local_run(local_run, zoo, url_list, s3_bucket):
    local_root, _ = local_run
    zoo.reset()
    s3_root = f"s3://{s3_bucket}/runs/zoo"
    result = run_crawl(zoo_config(s3_root, url_list, executor="local"))
    assert result.kept_rows == 16 and result.failed_shards == []
    s3_storage = Storage(s3_root)
    local_layout, s3_layout = RunLayout(Storage(local_root)), RunLayout(s3_storage)
    assert sorted(local_layout.manifests("crawl")) == sorted(s3_layout.manifests("crawl"))
    s3_frame = pl.read_parquet(f"{s3_root}/crawl/part-*.parquet", storage_options=s3_storage.polars_storage_options())
    local_frame = pl.read_parquet(f"{local_root}/crawl/part-*.parquet")
    # 16 kept + 2 dedup drops, which stay in the shards and are filtered through crawl/_dedup downstream
    assert s3_frame.height == local_frame.height == 18
    assert _comparable_images(s3_frame).equals(_comparable_images(local_frame))
    part_paths = [
        s3_storage.path(o.key)
        for o in s3_storage.list("crawl/")
        if "/part-" in "/" + o.key.split("/", 1)[1] and o.key.count("/") == 1
    ]
    s3_arrow = pads.dataset(part_paths, filesystem=s3_storage.filesystem, format="parquet").to_table()
    assert _comparable_images(pl.from_arrow(s3_arrow)).equals(_comparable_images(local_frame))
    assert _comparable_errors(s3_layout.read_errors("crawl")) == _comparable_errors(local_layout.read_errors("crawl"))


def test_retry_failed_recrawls_only_transient_failures(zoo, url_list, ray_local, tmp_path):
    zoo.reset()
    run_root = str(tmp_path / "run")
    first = run_crawl(zoo_config(run_root, url_list))
    assert first.errors_by_reason["http_500"] == 1
    missing_requests, slow_requests = zoo.count("/missing.jpg"), zoo.count("/slow.jpg")
    zoo.healed = True
    try:
        retried = run_crawl(zoo_config(run_root, url_list), retry_failed=True)
    finally:
        zoo.healed = False
    assert zoo.count("/missing.jpg") == missing_requests  # permanent: not retried
    assert zoo.count("/slow.jpg") > slow_requests  # transient: retried, still failing
    assert "http_500" not in retried.errors_by_reason
    assert retried.kept_rows == first.kept_rows + 1
    expected = {**ZOO_EXPECTED, "/error500.jpg": ("kept", "")}
    assert outcomes(RunLayout(Storage(run_root)), zoo) == expected
    attempts = {m.shard_id: m.attempt for m in RunLayout(Storage(run_root)).manifests("crawl").values()}
    assert sorted(attempts.values()).count(2) >= 1


def test_private_addresses_are_refused_by_default(zoo, tmp_path, ray_local):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{zoo.url('/good/0.jpg')}\nhttp://localhost:{zoo.base_url.rsplit(':', 1)[1]}/good/1.jpg\n")
    zoo.reset()
    config = load_run_config(
        None, ["executor.kind=local", "executor.progress=false"], run_root=str(tmp_path / "run"), sources=[str(urls)]
    )
    result = run_crawl(config)
    assert result.kept_rows == 0
    assert result.errors_by_reason == {"blocked_address": 2}
    assert sum(zoo.requests.values()) == 0

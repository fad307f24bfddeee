"""Issue 14 through a real crawl (in-process executor, loopback zoo): URL-list lines that used to kill a
shard or read local files now end as exactly one error row each, next to good items of the same shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl
from tests.support.zoo import ZOO_CRAWL_OVERRIDES


def crawl(tmp_path: Path, source: Path, *extra: str):
    config = load_run_config(
        None,
        [*ZOO_CRAWL_OVERRIDES, "crawl.shard_size=128", "executor.kind=local", "executor.progress=false", *extra],
        run_root=str(tmp_path / "run"),
        sources=[str(source)],
    )
    return run_crawl(config), RunLayout(Storage(config.run_root))


def error_reasons(layout: RunLayout) -> dict[str, str]:
    return {r["input_ref"]: r["reason"] for r in layout.read_errors("crawl").to_pylist()}


def test_bad_list_lines_become_error_rows_and_the_shard_keeps_its_good_items(zoo, tmp_path):
    local_image = tmp_path / "local.jpg"
    local_image.write_bytes(zoo.assets["/good/4.jpg"])
    lines = [
        "\ufeff" + zoo.url("/good/0.jpg"),  # a list saved with a byte-order mark
        "ftp://127.0.0.1/x.jpg",
        zoo.url("/big-xmp.png"),
        "file:///etc/passwd",
        str(local_image),
        "../rel.jpg",
        zoo.url("/good/1.jpg"),
    ]
    source = tmp_path / "list.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    zoo.reset()
    result, layout = crawl(tmp_path, source)
    assert result.failed_shards == [] and result.computed_shards == 1
    assert result.kept_rows == 2
    assert result.errors_by_reason == {"unsupported_scheme": 1, "oversized_metadata": 1, "local_file_refused": 3}
    reasons = error_reasons(layout)
    assert reasons[f"{source}#line=2"] == "unsupported_scheme"
    assert reasons["file:///etc/passwd"] == reasons[str(local_image)] == reasons["../rel.jpg"] == "local_file_refused"
    stored = b"".join(p.read_bytes() for p in Path(tmp_path / "run").rglob("*.parquet"))
    assert b"root:x:0:0" not in stored  # /etc/passwd was not read


def test_local_files_in_lists_are_read_only_when_allowed(zoo, tmp_path):
    local_image = tmp_path / "local.jpg"
    local_image.write_bytes(zoo.assets["/good/4.jpg"])
    source = tmp_path / "list.txt"
    source.write_text(f"{local_image}\nfile://{local_image}\n{tmp_path}/missing.jpg\n")
    result, _ = crawl(tmp_path, source, "crawl.allow_local_files=true", "crawl.dedup=false")
    assert result.kept_rows == 2 and result.errors_by_reason == {"not_found": 1}


def test_parquet_list_with_null_and_integer_urls_keeps_its_good_rows(zoo, tmp_path):
    source = tmp_path / "list.parquet"
    urls = [zoo.url("/good/0.jpg"), None, zoo.url("/good/1.jpg")]
    pq.write_table(pa.table({"url": pa.array(urls, pa.string()), "caption": ["a", "b", "c"]}), source)
    result, layout = crawl(tmp_path, source)
    assert (result.kept_rows, result.errors_by_reason, result.failed_shards) == (2, {"missing_url": 1}, [])
    [row] = layout.read_errors("crawl").to_pylist()
    assert row["message"] == f"row 2 of {source}: column 'url' is empty"
    assert row["transient"] is False

    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"url": [7, 8]}), ints)
    result, layout = crawl(tmp_path / "ints", ints)
    assert (result.kept_rows, result.errors_by_reason) == (0, {"invalid_url": 2})


def test_a_storage_failure_fails_only_its_shard_and_names_it_and_the_cause(zoo, tmp_path):
    """Shard-level causes fail the shard, named with the cause; the run (and its dedup) still ends cleanly."""
    source = tmp_path / "list.txt"
    source.write_text(zoo.url("/good/0.jpg") + "\n")
    (tmp_path / "run" / "crawl").mkdir(parents=True)
    (tmp_path / "run" / "crawl" / "errors").write_text("a file where the errors folder goes")
    result, _ = crawl(tmp_path, source)  # before: dedup over zero committed shards raised ArrowTypeError
    assert result.computed_shards == 0 and len(result.failed_shards) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    [failed] = summary["failed_shards"]
    assert failed["shard_id"] == result.failed_shards[0]
    assert "could not write" in failed["message"] and "crawl/errors/part-" in failed["message"]

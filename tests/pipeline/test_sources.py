"""Planning crawl inputs from txt/csv/parquet URL lists, local folders and S3 prefixes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl
from ps3_engine.pipeline.sources import plan_crawl, plan_items


def test_csv_metadata_columns_are_mapped(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("URL,licence,author,caption\nhttp://h/a.jpg,CC-BY-4.0,Ada,a cat\nhttp://h/b.jpg,,,\n")
    [(source, items)] = plan_items([str(path)], S3Settings())
    assert source == str(path)
    assert items[0]["source_ref"] == "http://h/a.jpg" and items[0]["source_kind"] == "http"
    assert (items[0]["license"], items[0]["attribution"]) == ("CC-BY-4.0", "Ada")
    assert json.loads(items[0]["metadata_json"]) == {"caption": "a cat"}
    assert (items[1]["license"], items[1]["attribution"], items[1]["metadata_json"]) == (None, None, "{}")


def test_parquet_list_and_repeated_urls_get_distinct_stable_ids(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["http://h/a.jpg", "http://h/a.jpg", "s3://b/k.png"], "width": [1, 2, 3]}), path)
    items = plan_items([str(path)], S3Settings())[0][1]
    ids = [i["item_id"] for i in items]
    assert len(set(ids)) == 3
    assert ids == [i["item_id"] for i in plan_items([str(path)], S3Settings())[0][1]]
    assert [i["source_kind"] for i in items] == ["http", "http", "s3"]
    assert json.loads(items[2]["metadata_json"]) == {"width": 3}


def test_list_without_url_column_is_a_clear_error(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("link\nhttp://h/a.jpg\n")
    with pytest.raises(ValueError, match="no URL column"):
        plan_items([str(path)], S3Settings())


def test_unknown_source_type_is_a_clear_error(tmp_path):
    path = tmp_path / "list.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported source"):
        plan_items([str(path)], S3Settings())


def test_plan_is_stable_and_not_rewritten(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://h/{i}.jpg\n" for i in range(10)))
    layout = RunLayout(Storage(str(tmp_path / "run")))
    first = plan_crawl(layout, [str(urls)], 4, S3Settings())
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "crawl" / "_input").iterdir()}
    second = plan_crawl(layout, [str(urls)], 4, S3Settings())
    assert [t.shard_id for t in first] == [t.shard_id for t in second] and len(first) == 3
    assert [t.input_checksum for t in first] == [t.input_checksum for t in second]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "crawl" / "_input").iterdir()}
    urls.write_text("".join(f"http://h/{i}.jpg\n" for i in range(11)))
    third = plan_crawl(layout, [str(urls)], 4, S3Settings())
    assert [t.input_checksum for t in third[:2]] == [t.input_checksum for t in first[:2]]
    assert third[2].input_checksum != first[2].input_checksum


def test_folder_and_s3_prefix_sources_crawl_through_the_storage_seam(tmp_path, zoo, s3_bucket, s3_server):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(zoo.assets["/good/0.jpg"])
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="src/b.jpg", Body=zoo.assets["/good/1.jpg"])
    client.put_object(Bucket=s3_bucket, Key="src/broken.jpg", Body=zoo.assets["/truncated.jpg"])
    config = load_run_config(
        None,
        ["executor.kind=local", "executor.progress=false"],
        run_root=str(tmp_path / "run"),
        sources=[str(folder), f"s3://{s3_bucket}/src/"],
    )
    result = run_crawl(config)
    assert result.kept_rows == 2
    assert result.errors_by_reason == {"truncated": 1}
    layout = RunLayout(Storage(config.run_root))
    kinds = sorted(
        r["source_kind"]
        for s in layout.manifests("crawl")
        for r in layout.read_output("crawl", s, columns=["source_kind"]).to_pylist()
    )
    assert kinds == ["file", "s3"]


def test_no_sources_is_a_clear_error(tmp_path):
    config = load_run_config(None, ["executor.kind=local"], run_root=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="no crawl sources"):
        run_crawl(config)


# -- issue 14: list rows that cannot be fetched become items with a reason, never a rejected list -------


def _reasons(items: list[dict]) -> list[tuple[str, str | None]]:
    return [
        (
            i["source_kind"],
            json.loads(i["metadata_json"]).get("_invalid_reason") if i["source_kind"] == "invalid" else None,
        )
        for i in items
    ]


def test_txt_list_with_a_byte_order_mark_keeps_its_first_url(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhttp://h/a.jpg\r\nhttp://h/b.jpg\r\n".encode())
    items = plan_items([str(path)], S3Settings())[0][1]
    assert [i["source_ref"] for i in items] == ["http://h/a.jpg", "http://h/b.jpg"]
    assert {i["source_kind"] for i in items} == {"http"}


def test_sibling_csv_header_with_a_byte_order_mark_finds_its_url_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffurl,license\nhttp://h/a.jpg,CC0\n".encode())
    [item] = plan_items([str(path)], S3Settings())[0][1]
    assert (item["source_ref"], item["license"]) == ("http://h/a.jpg", "CC0")


def test_parquet_list_with_a_null_url_cell_keeps_its_other_rows(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["http://h/a.jpg", None, "http://h/c.jpg"]}), path)
    items = plan_items([str(path)], S3Settings())[0][1]
    assert _reasons(items) == [("http", None), ("invalid", "missing_url"), ("http", None)]
    message = json.loads(items[1]["metadata_json"])["_invalid_message"]
    assert message == f"row 2 of {path}: column 'url' is empty"


def test_integer_url_column_rows_are_invalid_not_relative_paths(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"url": [1, 2]}), path)
    items = plan_items([str(path)], S3Settings())[0][1]
    assert _reasons(items) == [("invalid", "invalid_url")] * 2
    assert "holds a int (1), not a URL" in json.loads(items[0]["metadata_json"])["_invalid_message"]


def test_url_list_schemes_and_local_paths_are_classified(tmp_path):
    path = tmp_path / "mixed.txt"
    lines = ["ftp://127.0.0.1/x.jpg", "file:///etc/passwd", "/abs/path.jpg", "../rel.jpg", "data:image/png;base64,AAA"]
    path.write_text("\n".join(["http://h/a.jpg", "s3://b/k.jpg", *lines]) + "\n")
    items = plan_items([str(path)], S3Settings())[0][1]
    assert _reasons(items) == [
        ("http", None),
        ("s3", None),
        ("invalid", "unsupported_scheme"),
        ("local", None),
        ("local", None),
        ("local", None),
        ("invalid", "unsupported_scheme"),
    ]
    assert "line 3 of" in json.loads(items[2]["metadata_json"])["_invalid_message"]


def test_credentials_are_stripped_when_planning(tmp_path, caplog):
    path = tmp_path / "creds.csv"
    path.write_text("url,note\nhttp://user:secret@h/x.jpg,see https://a:secret@h/y\n")
    [item] = plan_items([str(path)], S3Settings())[0][1]
    assert item["source_ref"] == "http://h/x.jpg"
    assert "secret" not in json.dumps(item) and "secret" not in caplog.text
    assert "removed credentials from 1 URLs (first: row 1)" in caplog.text


def test_sibling_csv_row_longer_than_its_header_is_kept_with_the_surplus_as_metadata(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("url,license,author,caption\nhttp://h/a.jpg,CC0,Ada,a cat,extra,fields\nhttp://h/b.jpg,,,a dog\n")
    items = plan_items([str(path)], S3Settings())[0][1]  # before: TypeError sorting a None key with str keys
    assert json.loads(items[0]["metadata_json"]) == {"_extra_fields": ["extra", "fields"], "caption": "a cat"}
    assert len(items) == 2


def test_sibling_list_that_is_not_utf8_is_a_clear_error_naming_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("http://h/a.jpg\nhttp://h/caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: line 2 is not UTF-8"):
        plan_items([str(path)], S3Settings())

"""The plan record: re-planning an unchanged input reads and writes no shard; any change is still found."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ps3_engine.infra.storage import ObjectInfo, S3Settings, Storage
from ps3_engine.pipeline import sources
from ps3_engine.pipeline.input_record import read_record, recordable
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.sources import plan_crawl

SHARD_SIZE = 4


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """Keys of the stored input shards whose checksum a plan reads (the real reader, counted)."""
    keys: list[str] = []
    real = sources.stored_input_checksum

    def counted(layout: RunLayout, key: str) -> str | None:
        keys.append(key)
        return real(layout, key)

    monkeypatch.setattr(sources, "stored_input_checksum", counted)
    return keys


def _write_list(path: Path, num_urls: int, tag: str = "") -> str:
    path.write_text("".join(f"http://h/{tag}{i}.jpg\n" for i in range(num_urls)))
    return str(path)


def _snapshot(run: Path) -> dict[str, int]:
    """Write time (ns) of every file under the run's crawl folder: input shards and the record."""
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "crawl").rglob("*") if p.is_file()}


def _age_inputs(run: Path) -> None:
    """Give the input shards distinct write times in the past (file systems stamp many writes alike)."""
    base = datetime.now(UTC).timestamp() - 3600
    for offset, path in enumerate(sorted((run / "crawl" / "_input").iterdir())):
        os.utime(path, ns=(int((base + offset) * 1e9),) * 2)


def _planned(tmp_path: Path, num_urls: int = 40) -> tuple[RunLayout, Path, list[str]]:
    run = tmp_path / "run"
    layout = RunLayout(Storage(str(run)))
    lists = [_write_list(tmp_path / "urls.txt", num_urls)]
    plan_crawl(layout, lists, SHARD_SIZE, S3Settings())
    _age_inputs(run)
    plan_crawl(layout, lists, SHARD_SIZE, S3Settings())  # records the aged versions
    return layout, run, lists


def test_replanning_an_unchanged_input_reads_and_writes_nothing(tmp_path, reads):
    layout, run, lists = _planned(tmp_path)
    before, reads[:] = _snapshot(run), []
    first = plan_crawl(layout, lists, SHARD_SIZE, S3Settings(), persist=False)
    again = plan_crawl(layout, lists, SHARD_SIZE, S3Settings())
    assert again == first and len(again) == 10
    # Only the newest shard is read: a file written in the listing's last tick is never recorded.
    assert reads == [again[-1].input_key]
    assert _snapshot(run) == before
    assert set(read_record(layout.storage, RunLayout.CRAWL_PLAN_RECORD_KEY)) == {t.shard_id for t in again[:-1]}


def test_a_changed_deleted_or_damaged_shard_is_found_and_rewritten_despite_the_record(tmp_path, reads):
    layout, run, lists = _planned(tmp_path)
    tasks = plan_crawl(layout, lists, SHARD_SIZE, S3Settings(), persist=False)
    inputs = run / "crawl" / "_input"
    (inputs / f"{tasks[1].shard_id}.parquet").unlink()
    (inputs / f"{tasks[2].shard_id}.parquet").write_bytes(b"not parquet")
    (inputs / f"{tasks[4].shard_id}.parquet").replace(inputs / f"{tasks[3].shard_id}.parquet")  # other items
    reads[:] = []
    before = _snapshot(run)
    again = plan_crawl(layout, lists, SHARD_SIZE, S3Settings())
    assert again == tasks
    after = _snapshot(run)
    rewritten = {key for key in after if after[key] != before.get(key)}
    assert rewritten == {f"crawl/_input/{tasks[i].shard_id}.parquet" for i in (1, 2, 3, 4)} | {
        RunLayout.CRAWL_PLAN_RECORD_KEY
    }
    # 1 was listed as gone (nothing to read); 2 and 3 changed versions; 4 was moved away; 9 is the newest.
    assert sorted(reads) == sorted(tasks[i].input_key for i in (2, 3, 9))
    for task in again:
        assert sources.stored_input_checksum(layout, task.input_key) == task.input_checksum


def test_an_edited_list_rewrites_only_its_changed_shards(tmp_path):
    layout, run, lists = _planned(tmp_path)
    tasks = plan_crawl(layout, lists, SHARD_SIZE, S3Settings(), persist=False)
    text = Path(lists[0]).read_text().splitlines(keepends=True)
    text[21] = "http://h/edited.jpg\n"  # shard 5 (items 20-23)
    Path(lists[0]).write_text("".join(text))
    before = _snapshot(run)
    again = plan_crawl(layout, lists, SHARD_SIZE, S3Settings())
    assert [t.shard_id for t, old in zip(again, tasks, strict=True) if t != old] == [tasks[5].shard_id]
    after = _snapshot(run)
    assert {key for key in after if after[key] != before[key]} == {
        tasks[5].input_key,
        RunLayout.CRAWL_PLAN_RECORD_KEY,
    }
    assert sources.stored_input_checksum(layout, tasks[5].input_key) == again[5].input_checksum


def test_an_unreadable_record_only_costs_the_checks(tmp_path, reads):
    layout, run, lists = _planned(tmp_path)
    (run / RunLayout.CRAWL_PLAN_RECORD_KEY).write_bytes(b"PAR1 broken")
    inputs_before = {k: v for k, v in _snapshot(run).items() if k.startswith("crawl/_input/")}
    reads[:] = []
    again = plan_crawl(layout, lists, SHARD_SIZE, S3Settings())
    assert len(reads) == len(again) == 10
    assert {k: v for k, v in _snapshot(run).items() if k.startswith("crawl/_input/")} == inputs_before
    assert set(read_record(layout.storage, RunLayout.CRAWL_PLAN_RECORD_KEY)) == {t.shard_id for t in again[:-1]}


def test_another_list_planned_into_the_same_root_keeps_the_first_recorded(tmp_path, reads):
    layout, _run, lists = _planned(tmp_path)
    first = plan_crawl(layout, lists, SHARD_SIZE, S3Settings(), persist=False)
    plan_crawl(layout, [_write_list(tmp_path / "other.txt", 8, tag="o")], SHARD_SIZE, S3Settings())
    assert set(read_record(layout.storage, RunLayout.CRAWL_PLAN_RECORD_KEY)) >= {t.shard_id for t in first[:-1]}
    reads[:] = []
    assert plan_crawl(layout, lists, SHARD_SIZE, S3Settings()) == first
    assert reads == [first[-1].input_key]
    # The other list's shards are newer, so the first list's last shard is recorded now too.
    reads[:] = []
    assert plan_crawl(layout, lists, SHARD_SIZE, S3Settings()) == first
    assert reads == []


def test_only_files_older_than_the_newest_listed_are_recorded():
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

    def obj(name: str, seconds_ago: int) -> ObjectInfo:
        modified = now - timedelta(seconds=seconds_ago)
        return ObjectInfo(f"crawl/_input/{name}.parquet", 10, f"10-{modified.timestamp()}", modified)

    listed = {"a": obj("a", 5), "b": obj("b", 0), "c": obj("c", 0), "d": obj("d", 2)}
    checksums = {"a": "ca", "b": "cb", "c": "cc", "e": "ce"}
    assert recordable(listed, checksums) == {"a": ("ca", listed["a"].version)}
    assert recordable({}, checksums) == {}

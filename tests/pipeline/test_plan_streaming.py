"""Streaming planning (issue 15 item 1): lists read in blocks, many lists at once, bounded memory, no rewrites."""

from __future__ import annotations

import logging
import random
import re
import tracemalloc
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline import sources
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.sources import plan_crawl, plan_items
from ps3_engine.pipeline.streaming import OccurrenceIndex, ordered_prefetch
from ps3_engine.stages.crawl import item_id_for


def _lists(tmp_path, num_files: int = 3, per_file: int = 400) -> list[str]:
    """Text, CSV and Parquet lists with awkward line breaks, a BOM, quoted newlines and URLs repeated across files."""
    rng = random.Random(7)
    urls = [f"http://h{rng.randint(0, 3)}/{rng.randint(0, 60)}.jpg" for _ in range(num_files * per_file)]
    breaks = ["\n", "\r\n", "\r", "\u2028", "\n\n", "\n# comment\n"]
    paths = []
    for index in range(num_files):
        chunk = urls[index * per_file : (index + 1) * per_file]
        if index % 3 == 0:
            path = tmp_path / f"l{index}.txt"
            path.write_text("\ufeff" + "".join(u + rng.choice(breaks) for u in chunk) + "http://u:pw@h/z.jpg")
        elif index % 3 == 1:
            path = tmp_path / f"l{index}.csv"
            rows = "".join(
                f'{u},CC0,"two\nlines {i}"\n' if i % 5 == 0 else f"{u},,x,surplus\n" for i, u in enumerate(chunk)
            )
            path.write_text("\ufeffurl,license,caption\n" + rows, newline="")
        else:
            path = tmp_path / f"l{index}.parquet"
            pq.write_table(pa.table({"url": [*chunk, None, ""]}), path, row_group_size=50)
        paths.append(str(path))
    return paths


def test_lists_read_in_tiny_blocks_plan_the_same_items_as_whole_reads(tmp_path, monkeypatch):
    paths = _lists(tmp_path)
    whole = plan_items(paths, S3Settings())
    monkeypatch.setattr(sources, "READ_BLOCK", 5)  # every \r\n, BOM and multi-byte char crosses a block edge
    monkeypatch.setattr(sources, "ROW_BATCH", 7)
    assert plan_items(paths, S3Settings()) == whole
    text = (tmp_path / "l0.txt").read_text(encoding="utf-8-sig")
    expected = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert [i["source_ref"] for i in whole[0][1]] == [*expected[:-1], "http://h/z.jpg"]
    assert len(whole[1][1]) == 400 and len(whole[2][1]) == 402  # quoted newlines stay in their row; null rows kept


def test_ids_count_repeats_across_files_in_source_order_whatever_the_timing(tmp_path, monkeypatch):
    paths = _lists(tmp_path, num_files=6)
    ahead = plan_items(paths, S3Settings())
    monkeypatch.setattr(sources, "PLAN_AHEAD", 1)
    assert plan_items(paths, S3Settings()) == ahead
    seen: Counter[str] = Counter()
    for _, items in ahead:
        for item in items:
            assert item["item_id"] == item_id_for(item["source_ref"], seen[item["source_ref"]])
            seen[item["source_ref"]] += 1
    assert max(seen.values()) > 5  # the lists do repeat URLs, within and across files


def test_occurrence_index_counts_exactly_over_many_batches():
    rng = random.Random(1)
    index, counter = OccurrenceIndex(), Counter()
    for _ in range(60):
        refs = [f"r{rng.randint(0, 3000)}" for _ in range(rng.randint(0, 200))]
        expected = []
        for ref in refs:
            expected.append(counter[ref])
            counter[ref] += 1
        assert index.occurrences(refs) == expected
    assert len(index) == len(counter)


def test_a_failing_list_among_many_is_raised_in_order_and_names_its_line(tmp_path):
    paths = _lists(tmp_path, num_files=4)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"http://h/a.jpg\n" * 3 + b"http://h/caf\xe9.jpg\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 4 is not UTF-8"):
        plan_items([*paths[:2], str(bad), *paths[2:]], S3Settings())


def test_ordered_prefetch_keeps_order_and_stops_producers_early():
    def producer(n):
        return lambda: iter(range(n * 100, n * 100 + 50))

    assert list(ordered_prefetch((producer(n) for n in range(8)), ahead=3)) == [
        v for n in range(8) for v in range(n * 100, n * 100 + 50)
    ]
    stream = ordered_prefetch((producer(n) for n in range(8)), ahead=3)
    assert next(stream) == 0
    stream.close()  # must not hang on producers blocked on full queues


def test_replanning_an_unchanged_input_rewrites_nothing_and_a_change_rewrites_its_shards(tmp_path, caplog):
    paths = _lists(tmp_path, num_files=3)
    layout = RunLayout(Storage(str(tmp_path / "run")))
    first = plan_crawl(layout, paths, 64, S3Settings())
    inputs = tmp_path / "run" / "crawl" / "_input"
    mtimes = {p.name: p.stat().st_mtime_ns for p in inputs.iterdir()}
    assert len(mtimes) == len(first) == 21
    with caplog.at_level(logging.INFO, logger="ps3_engine.pipeline.sources"):
        again = plan_crawl(layout, paths, 64, S3Settings())
    assert again == first
    assert re.search(r"21 crawl input shards: \d+ unchanged by the plan record, \d+ checked, 0 written", caplog.text)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in inputs.iterdir()}
    table = pq.read_table(paths[2])
    pq.write_table(
        table.set_column(0, "url", pa.array(["http://changed/x.jpg", *table["url"].to_pylist()[1:]])), paths[2]
    )
    third = plan_crawl(layout, paths, 64, S3Settings())
    changed = {t.shard_id for t, old in zip(third, first, strict=True) if t.input_checksum != old.input_checksum}
    rewritten = {p.name.removesuffix(".parquet") for p in inputs.iterdir() if p.stat().st_mtime_ns != mtimes[p.name]}
    assert rewritten == changed and len(changed) >= 1


def _peak_bytes(plan) -> int:
    tracemalloc.start()
    try:
        plan()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_planning_memory_does_not_grow_with_the_list(tmp_path, monkeypatch):
    """Peak Python allocations while planning 40k URLs stay far below what holding the items takes.

    The streaming peak is a read block and a few batches per list being read, whatever the list size; both
    are made small here so that the comparison needs only a small list.
    """
    monkeypatch.setattr(sources, "ROW_BATCH", 256)
    monkeypatch.setattr(sources, "READ_BLOCK", 1 << 16)
    path = tmp_path / "big.txt"
    path.write_text("".join(f"https://img{i % 97}.example.com/p/{i:08d}.jpg\n" for i in range(40_000)))
    layout = RunLayout(Storage(str(tmp_path / "run")))
    tasks = []
    streaming = _peak_bytes(lambda: tasks.extend(plan_crawl(layout, [str(path)], 128, S3Settings(), persist=False)))
    holding = _peak_bytes(lambda: plan_items([str(path)], S3Settings()))
    assert len(tasks) == 313
    assert streaming < holding / 5, (streaming, holding)

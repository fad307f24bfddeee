"""Pipelined run (pipeline/pipelined.py): the stages stream into each other, and the corpus is the same.

Two URL lists (two sources, so two shard-id prefixes) of generated scenes, 2 images per crawl shard and
1 shard per dedup wave: byte copies (also across the lists) and a resized copy planted in later waves,
and a LARGER copy of an early image in a later wave (it must not take over: earlier waves are final).
A pipelined run and a stage-by-stage run over the same inputs must give the same dedup drops and the
same corpus, row for row.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline import run_state
from ps3_engine.pipeline.cli import _print_results, main
from ps3_engine.pipeline.executor import RayDataExecutor, worker_count
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.lineage import trace_region
from ps3_engine.pipeline.pipelined import ChainStep, DedupGate, wave_ordered
from ps3_engine.pipeline.plan import plan_run
from ps3_engine.pipeline.runner import plan_caption, run_pipeline, stage_specs
from ps3_engine.pipeline.samples import write_scenes
from ps3_engine.pipeline.status import run_status
from tests.support.corpus_run import run_config
from tests.support.pdfs import text_pdf

SHARD_SIZE = 2
# A held request is answered after this long at the latest; the tests that hold raise the crawl's timeouts
# above it (HOLD_TIMEOUTS), so that a held request is slow, never failed.
HOLD_DEADLINE_S = 120.0
HOLD_TIMEOUTS = ("crawl.http.read_timeout_s=180", "crawl.http.total_timeout_s=240")


@dataclass
class Hold:
    """Requests for ``paths`` (relative to the site root) wait until ``released()`` is true.

    Tests that assert an ordering of the run (segment working while the crawl is not finished) hold the
    crawl's last images until the event they assert has happened, instead of slowing every response and
    hoping the machine is fast enough: the ordering then follows from the code, not from timing. When the
    event never comes (a regression), the request is answered after ``HOLD_DEADLINE_S`` and the test fails.
    """

    paths: frozenset[str]
    released: Callable[[], bool]

    def wait(self) -> None:
        deadline = time.monotonic() + HOLD_DEADLINE_S
        while not self.released() and time.monotonic() < deadline:
            time.sleep(0.05)


class _HoldingHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        hold = self.server.hold
        if hold is not None and self.path.lstrip("/") in hold.paths:
            hold.wait()
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Site:
    lists: list[str]  # the two URL list files
    base_url: str
    server: ThreadingHTTPServer

    @contextmanager
    def holding(self, paths: Iterable[str], released: Callable[[], bool]) -> Iterator[None]:
        self.server.hold = Hold(frozenset(paths), released)
        try:
            yield
        finally:
            self.server.hold = None

    def last_paths(self) -> list[str]:
        """The last image path of each list: one of them is in the last crawl shard of the run."""
        return [Path(lst).read_text().split()[-1].removeprefix(f"{self.base_url}/") for lst in self.lists]


@contextmanager
def _serve(root: Path) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_HoldingHandler, directory=str(root)))
    server.hold = None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """A loopback site with planted cross-wave duplicates and two URL lists of it."""
    root = tmp_path_factory.mktemp("pipelined-site")
    scenes = write_scenes(root / "img", 8, size=(1200, 900))
    first = Image.open(scenes[0])
    # A byte copy and a smaller resized copy of scene 0 (near duplicate), and a larger copy of scene 1.
    shutil.copy(scenes[0], root / "img" / "copy-of-0.jpg")
    first.resize((1080, 810)).save(root / "img" / "smaller-0.jpg", quality=92)
    Image.open(scenes[1]).resize((1600, 1200)).save(root / "img" / "larger-1.jpg", quality=92)
    with _serve(root) as server:
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        lists = []
        # List a: scenes 0-5, then (later waves) the larger copy of scene 1 and both copies of scene 0.
        later = ["img/larger-1.jpg", "img/copy-of-0.jpg", "img/smaller-0.jpg"]
        a = [f"img/{p.name}" for p in scenes[:6]] + later
        # List b (another source, so its own waves): a byte copy of scene 2 among new scenes.
        shutil.copy(scenes[2], root / "img" / "copy-of-2.jpg")
        b = [f"img/{scenes[6].name}", "img/copy-of-2.jpg", f"img/{scenes[7].name}"]
        for name, paths in (("a.txt", a), ("b.txt", b)):
            (root / name).write_text("".join(f"{base_url}/{p}\n" for p in paths))
            lists.append(str(root / name))
        yield Site(lists, base_url, server)


def _config(run_root: Path, lists: list[str], captioner: Path, *extra: str):
    """The corpus tests' run config (tests/support/corpus_run.py) over both lists, small shards, 1-shard waves."""
    waves = [f"crawl.shard_size={SHARD_SIZE}", "crawl.dedup_wave_shards=1"]
    config = run_config(Path(lists[0]), run_root, captioner, *waves, *extra)
    return config.model_copy(update={"sources": lists})


def _corpus(run_root: Path) -> list[dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((run_root / "dataset" / "images").rglob("*.parquet")))
    return sorted(table.to_pylist(), key=lambda row: row["image_id"])


def _drops(run_root: Path) -> list[tuple]:
    table = pq.read_table(run_root / "crawl" / "_dedup" / "dropped.parquet")
    return sorted(zip(*(table[c].to_pylist() for c in ("item_id", "reason", "message")), strict=True))


@pytest.fixture(scope="module")
def stage_by_stage(site, tiny_captioner, tmp_path_factory):
    lists = site.lists
    root = tmp_path_factory.mktemp("by-stage") / "run"
    results = run_pipeline(_config(root, lists, tiny_captioner, "executor.kind=local", "executor.pipelined=false"))
    assert all(not r.failed_shards for r in results)
    return root


def test_pipelined_in_process_equals_stage_by_stage(site, tiny_captioner, stage_by_stage, tmp_path):
    lists = site.lists
    root = tmp_path / "run"
    results = run_pipeline(_config(root, lists, tiny_captioner, "executor.kind=local"))
    assert [r.stage for r in results] == ["crawl", "segment", "caption", "build-corpus"]
    assert all(not r.failed_shards for r in results)
    assert _drops(root) == _drops(stage_by_stage)
    assert _corpus(root) == _corpus(stage_by_stage)
    # Earlier waves are final: the larger copy of scene 1 (a later wave) is dropped, scene 1 stays.
    urls = {row["url"].rsplit("/", 1)[-1] for row in _corpus(root)}
    assert "larger-1.jpg" not in urls and "scene-00001.jpg" in urls
    assert "copy-of-0.jpg" not in urls and "smaller-0.jpg" not in urls
    crawl = results[0]
    assert crawl.dedup and crawl.dedup["dropped_exact"] == 2 and crawl.dedup["dropped_near"] == 2
    # The gate left the links of its waves for the next increment.
    assert (root / "crawl/_dedup/links.parquet").exists()

    # A rerun computes nothing and keeps the corpus.
    again = run_pipeline(_config(root, lists, tiny_captioner, "executor.kind=local"))
    assert [r.computed_shards for r in again] == [0, 0, 0, 0]
    assert _corpus(root) == _corpus(stage_by_stage)
    # --force caption recomputes caption and the corpus rows only, through the same chain.
    forced = run_pipeline(_config(root, lists, tiny_captioner, "executor.kind=local"), force=frozenset({"caption"}))
    shards = results[1].planned_shards
    assert [r.computed_shards for r in forced] == [0, 0, shards, shards]
    assert _corpus(root) == _corpus(stage_by_stage)


@pytest.mark.slow
def test_pipelined_on_ray_streams_and_equals_stage_by_stage(site, tiny_captioner, stage_by_stage, tmp_path, ray_local):
    lists = site.lists
    root = tmp_path / "run"

    def committed(stage: str) -> list[str]:
        return sorted(json.loads(p.read_text())["created_at"] for p in (root / stage / "_manifest").glob("*.json"))

    # Streaming, not barriers: the last crawl shard's image is held until a segment shard is committed.
    # With barriers, segment would wait for that shard: the hold runs out and the order assert below fails.
    with site.holding(site.last_paths(), released=lambda: bool(committed("segment"))):
        results = run_pipeline(
            _config(root, lists, tiny_captioner, "executor.kind=ray", "crawl.max_workers=1", *HOLD_TIMEOUTS)
        )
    assert all(not r.failed_shards for r in results)
    assert _drops(root) == _drops(stage_by_stage)
    assert _corpus(root) == _corpus(stage_by_stage)
    assert committed("segment")[0] < committed("crawl")[-1]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["stages"]["crawl"]["computed_shards"] == len(committed("crawl"))
    # The summary counts the chain's workers (the pass after the chain, with nothing left, used none).
    config = _config(root, lists, tiny_captioner, "executor.kind=ray", "crawl.max_workers=1")
    specs = stage_specs(config)
    for stage in ("segment", "caption"):
        wanted = RayDataExecutor.fit_resources(specs[stage].build().resources, stage)
        expected = worker_count(wanted, len(committed("crawl")), config.executor.max_workers)
        assert summary["stages"][stage]["workers"] == expected, stage


def test_the_gate_releases_whole_waves_in_key_order(tmp_path):
    from ps3_engine.infra.storage import Storage

    planned = ["bbbbbbbb-00000", "aaaaaaaa-00001", "aaaaaaaa-00000", "bbbbbbbb-00001"]
    gate = DedupGate(Storage(str(tmp_path)), planned, [], True, 4, wave_shards=1)
    # Nothing committed: shards leave without a segment task, but only when every earlier wave has.
    assert gate.feed("aaaaaaaa-00001", "[]") == []
    assert gate.feed("bbbbbbbb-00000", "[]") == []
    released = gate.feed("aaaaaaaa-00000", "[]")
    assert [shard for shard, _, _ in released] == ["aaaaaaaa-00000", "aaaaaaaa-00001", "bbbbbbbb-00000"]
    assert all(task is None for _, task, _ in released)
    assert [s for s, _, _ in gate.feed("bbbbbbbb-00001", "[]")] == ["bbbbbbbb-00001"]


def test_the_gate_of_a_paper_scale_run_is_built_at_once(tmp_path):
    """80k planned crawl shards (10M items at 128 per shard): building the gate rebuilt the set of planned
    shards once per shard (quadratic, 2.4 s at 8k shards, minutes at 80k) before the chain could start."""
    planned = [f"{prefix}-{i:05d}" for prefix in ("aaaaaaaa", "bbbbbbbb") for i in range(40_000)]
    # No time limit asserted (speed belongs in benchmarks): quadratic, this test would run for minutes.
    gate = DedupGate(Storage(str(tmp_path)), planned, [*planned[:5], "cccccccc-00000"], True, 4, wave_shards=64)
    assert sum(len(w) for w in gate.waiting.values()) == len(planned)
    assert gate.waiting[("cccccccc", 0)] == set()  # a committed shard of an earlier plan is not awaited


def test_crawl_tasks_are_ordered_by_wave():
    from ps3_engine.pipeline.layout import ShardTask

    ids = ["bbbbbbbb-00000", "aaaaaaaa-00002", "aaaaaaaa-00000", "aaaaaaaa-00001"]
    tasks = [ShardTask("crawl", s, f"k/{s}", "c", ()) for s in ids]
    assert [t.shard_id for t in wave_ordered(tasks, 2)] == [
        "aaaaaaaa-00000",
        "aaaaaaaa-00001",
        "aaaaaaaa-00002",
        "bbbbbbbb-00000",
    ]


def test_pipelined_without_dedup_builds_the_planners_tasks(site, tiny_captioner, stage_by_stage, tmp_path):
    """``crawl.dedup=false`` after a deduplicated run: the gate excludes repeated image ids like the planner.

    Before, the gate passed every row on, so the pass after the chain found each such task different from
    its own and computed the shard a second time (summary: more shards computed than planned).
    """
    lists = site.lists
    root = tmp_path / "run"
    shutil.copytree(stage_by_stage, root)
    results = run_pipeline(_config(root, lists, tiny_captioner, "executor.kind=local", "crawl.dedup=false"))
    # Only the shards of the two near duplicates (larger-1.jpg, smaller-0.jpg) change; each is computed once.
    assert [r.computed_shards for r in results] == [0, 2, 2, 2]
    assert all(r.skipped_shards == r.planned_shards - 2 for r in results[1:])
    # Byte copies stay out (one image id, one corpus row); the near duplicates come in without dedup.
    image_ids = [row["image_id"] for row in _corpus(root)]
    assert len(image_ids) == len(set(image_ids)) == len(_corpus(stage_by_stage)) + 2
    again = run_pipeline(_config(root, lists, tiny_captioner, "executor.kind=local", "crawl.dedup=false"))
    assert [r.computed_shards for r in again] == [0, 0, 0, 0]
    # A step whose shard is complete and fresh skips it without building its worker (no model loaded).
    storage = Storage(str(root))
    spec = stage_specs(_config(root, lists, tiny_captioner))["caption"]
    step = ChainStep(spec, "caption", storage, force=False)
    assert step.run(plan_caption(RunLayout(storage))[0]).status == "skipped"
    assert step._worker is None
    step.close()


@pytest.mark.parametrize("pipelined", ["true", "false"])
@pytest.mark.parametrize("text", ["", "\n   \n# only comments\n\n# and blank lines\n"], ids=["empty", "blank"])
def test_run_over_a_list_without_urls_stops_with_one_line(tmp_path, capsys, text, pipelined):
    """Before, the crawl ran over nothing and the run stopped at segment with "run 'ps3-engine crawl' first"
    (the user had), leaving a run.json that made the root look like a run."""
    urls = tmp_path / "urls.txt"
    urls.write_text(text)
    root = tmp_path / "run"
    argv = ["run", "--input", str(urls), "--run-root", str(root), "--executor", "local"]
    assert main([*argv, "--set", "executor.progress=false", "--set", f"executor.pipelined={pipelined}"]) == 2
    err = capsys.readouterr().err  # the INFO log lines of planning go to stderr too
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("ps3-engine:")] == [
        f"ps3-engine: error: nothing to crawl: {urls} gave no items "
        "(an empty list, only blank lines and comments, or a folder without images)"
    ]
    assert not (root / "run.json").exists()


@pytest.mark.parametrize("with_images", [True, False], ids=["with-images", "documents-only"])
def test_run_over_a_pdf_source_without_pdfs_stops_before_any_stage(tmp_path, capsys, with_images):
    """Before, a documents-only run stopped at build-corpus with "run 'ps3-engine caption' first", and one
    with images crawled, segmented and captioned them first (render comes after the image stages)."""
    folder = tmp_path / "pdfs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a PDF")
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/never-fetched.jpg\n")
    root = tmp_path / "run"
    argv = ["run", "--documents", str(folder), "--run-root", str(root), "--executor", "local"]
    argv += ["--set", "executor.progress=false", *(["--input", str(urls)] if with_images else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("ps3-engine:")] == [
        f"ps3-engine: error: nothing to render: {folder} gave no PDFs "
        "(an empty list, only blank lines and comments, or a folder without .pdf files)"
    ]
    assert not (root / "run.json").exists() and not (root / "crawl").exists()


def test_pipelined_run_where_every_item_fails_ends_cleanly(site, tiny_captioner, tmp_path, capsys):
    """All 404s and pages that are not images: one error row per item, every stage ends, status --check OK."""
    base_url = site.base_url
    urls = tmp_path / "all-fail.txt"
    paths = ("img/missing-0.jpg", "a.txt", "img/missing-1.jpg", "b.txt", "img/missing-2.jpg")
    urls.write_text("".join(f"{base_url}/{p}\n" for p in paths))
    root = tmp_path / "run"
    config = run_config(urls, root, tiny_captioner, f"crawl.shard_size={SHARD_SIZE}")
    results = run_pipeline(config)
    assert [r.computed_shards for r in results] == [3, 3, 3, 3]
    assert all(not r.failed_shards for r in results)
    assert results[0].errors_by_reason == {"http_404": 3, "not_an_image": 2}
    errors = RunLayout(Storage(str(root))).read_errors("crawl").column("item_id").to_pylist()
    assert len(errors) == len(set(errors)) == len(paths)
    assert [r.output_rows for r in results] == [0, 0, 0, 0]
    _print_results(config, results)
    assert "[dataset] no images: every item was filtered or failed" in capsys.readouterr().out
    assert main(["status", "--check", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    assert [r.computed_shards for r in run_pipeline(config)] == [0, 0, 0, 0]


def test_pipelined_run_keeps_waiting_stages_alive_in_status(site, tiny_captioner, tmp_path, monkeypatch):
    """While the first dedup wave is crawled, segment, caption and corpus report nothing; their in-progress
    records must still be refreshed, or status calls a live run "interrupted" (records were rewritten only
    when a shard of their stage reported)."""
    lists = site.lists
    monkeypatch.setattr(run_state, "HEARTBEAT_INTERVAL_S", 0.1)
    monkeypatch.setattr(run_state, "STALE_AFTER_S", 1.0)
    root = tmp_path / "run"
    # List a: 9 images in 5 shards and one wave; its last image is held until the watcher has seen segment
    # wait longer than a record takes to go stale, so segment waits for its first shard that long.
    config = run_config(Path(lists[0]), root, tiny_captioner, f"crawl.shard_size={SHARD_SIZE}", *HOLD_TIMEOUTS)
    seen: list[tuple[str, float]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not list((root / "segment" / "_manifest").glob("*.json")):
            record = run_state.read_running(Storage(str(root))).get("segment")
            # status lists segment once a crawl shard is committed (its planner needs one)
            segment = run_status(str(root))["stages"].get("segment") if record is not None else None
            if segment is not None:
                seen.append((segment.state, time.time() - record.started.timestamp()))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def waited() -> list[str]:
        return [state for state, age in list(seen) if age > 2 * run_state.STALE_AFTER_S]

    try:
        with site.holding(site.last_paths()[:1], released=lambda: bool(waited())):
            assert all(not r.failed_shards for r in run_pipeline(config))
    finally:
        done.set()
        watcher.join()
    assert waited(), seen  # the wave took long enough to tell a live record from a dead one
    assert set(waited()) == {"running"}, seen
    assert not run_state.read_running(Storage(str(root)))  # every record is gone once the run ends


def test_pipelined_run_with_documents_adds_pages_to_the_same_corpus(site, tiny_captioner, stage_by_stage, tmp_path):
    """``run --documents`` beside URL lists: the chain for the images, render for the PDFs, one corpus."""
    lists = site.lists
    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    for seed in range(2):
        (pdfs / f"doc-{seed}.pdf").write_bytes(text_pdf(num_pages=2, seed=seed).data)
    (pdfs / "broken.pdf").write_bytes(b"%PDF-1.7 not really")
    root = tmp_path / "run"
    config = _config(root, lists, tiny_captioner).model_copy(update={"document_sources": [str(pdfs)]})
    results = run_pipeline(config)
    assert [r.stage for r in results] == ["crawl", "segment", "caption", "render", "build-corpus"]
    assert all(not r.failed_shards for r in results)
    assert results[3].errors_by_reason == {"broken_pdf": 1} and results[3].output_rows == 4
    rows = _corpus(root)
    assert [r for r in rows if r["source_type"] == "natural"] == _corpus(stage_by_stage)
    assert sum(r["source_type"] == "document" for r in rows) == 4
    assert main(["status", "--check", str(root)]) == 0
    # status shows render, and counts the pages' corpus shard under build-corpus (before: neither).
    status = run_status(str(root))["stages"]
    assert (status["render"].state, status["render"].errors_by_reason) == ("done", {"broken_pdf": 1})
    assert status["build-corpus"].state == "done"
    assert status["build-corpus"].done == status["caption"].planned + status["render"].planned
    assert [r.computed_shards for r in run_pipeline(config)] == [0, 0, 0, 0, 0]
    # plan covers the document branch (before: a changed render setting showed nothing to compute).
    plans = {plan.stage: plan for plan in plan_run(config)}
    assert list(plans) == ["crawl", "segment", "caption", "render", "build-corpus"]
    assert all(not plan.recompute for plan in plans.values())
    assert plans["build-corpus"].shards == plans["caption"].shards + plans["render"].shards
    dpi = config.model_copy(update={"render": config.render.model_copy(update={"dpi": 100.0})})
    plans = {plan.stage: plan.reasons for plan in plan_run(dpi)}
    assert plans["render"] == {"config changed": 1} and plans["build-corpus"] == {"upstream shard recomputes": 1}
    # --force render: plan says what the run does (every render shard, the pages' corpus shards after it).
    forced = {plan.stage: plan for plan in plan_run(config, force=frozenset({"render"}))}
    assert forced["render"].reasons == {"forced": 1} and not forced["caption"].recompute
    assert forced["build-corpus"].reasons == {"forced": forced["render"].shards}  # not the images' rows
    # trace finds a page's region too (before: "region ... is in no segment shard of this run").
    page = next(r for r in rows if r["source_type"] == "document")
    trace = trace_region(RunLayout(Storage(str(root))), page["regions"][0]["region_id"])
    assert trace["document"]["source_ref"] in {str(pdfs / f"doc-{seed}.pdf") for seed in range(2)}
    assert trace["captions"][0]["text"] == page["regions"][0]["caption"]
    assert trace["corpus"]["in_corpus"] and trace["corpus"]["dataset_shard"].startswith("dataset/images/")
    image = next(r for r in rows if r["source_type"] == "natural")
    assert trace_region(RunLayout(Storage(str(root))), image["regions"][0]["region_id"])["crawl"]["source_ref"]


@pytest.mark.slow
def test_pipelined_force_crawl_and_segment_recompute_and_keep_the_corpus(
    site, tiny_captioner, stage_by_stage, tmp_path
):
    """``run --force segment`` / ``--force crawl`` after a finished run: every shard from that stage on."""
    lists = site.lists
    root = tmp_path / "run"
    shutil.copytree(stage_by_stage, root)
    config = _config(root, lists, tiny_captioner)
    shards = len(list((root / "crawl" / "_manifest").glob("*.json")))
    forced = run_pipeline(config, force=frozenset({"segment"}))
    assert [r.computed_shards for r in forced] == [0, shards, shards, shards]
    assert _corpus(root) == _corpus(stage_by_stage)
    forced = run_pipeline(config, force=frozenset({"crawl"}))
    assert [r.computed_shards for r in forced] == [shards] * 4
    assert _drops(root) == _drops(stage_by_stage)
    assert _corpus(root) == _corpus(stage_by_stage)
    assert main(["status", "--check", str(root)]) == 0


def test_pipelined_run_stopped_by_ctrl_c_is_interrupted_at_once_and_a_rerun_finishes(
    site, tiny_captioner, tmp_path, monkeypatch
):
    """Ctrl-C in the chain: status says "interrupted" right away (before: "running" until the heartbeat
    went stale, 3 minutes), and the rerun finishes every stage with every item accounted for."""
    lists = site.lists
    root = tmp_path / "run"
    config = run_config(
        Path(lists[1]), root, tiny_captioner, f"crawl.shard_size={SHARD_SIZE}", "crawl.dedup_wave_shards=1"
    )
    advance = ChainStep.advance

    def interrupted_at_caption(self, shard_id, task, prepared=None):
        if self.stage == "caption":
            raise KeyboardInterrupt
        return advance(self, shard_id, task, prepared)

    with monkeypatch.context() as patch:
        patch.setattr(ChainStep, "advance", interrupted_at_caption)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(config)
    states = {name: s.state for name, s in run_status(str(root))["stages"].items()}
    assert states == dict.fromkeys(("crawl", "segment", "caption"), "interrupted"), states
    assert all(not r.failed_shards for r in run_pipeline(config))
    assert {s.state for s in run_status(str(root))["stages"].values()} == {"done"}
    assert not run_state.read_running(Storage(str(root)))
    assert main(["status", "--check", str(root)]) == 0

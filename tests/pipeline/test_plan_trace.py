"""Rerun planning, --force, lineage (trace) and the conservation check on a full captioned run."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_pipeline, stage_fingerprints
from ps3_engine.pipeline.samples import write_scenes


def overrides_for(tiny_captioner) -> list[str]:
    return [
        "executor.kind=local",
        "executor.progress=false",
        "crawl.shard_size=2",
        "crawl.min_short_side=512",
        "crawl.min_long_side=512",
        "caption.backend=transformers",
        f"caption.model={tiny_captioner}",
        "caption.transformers.device=cpu",
        "caption.max_pixels=12544",
        "caption.sampling.max_new_tokens=48",
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_captioner):
    folder = tmp_path_factory.mktemp("plan-images")
    write_scenes(folder, 4, size=(1200, 900))
    run_root = tmp_path_factory.mktemp("plan-run") / "run"
    config = load_run_config(None, overrides_for(tiny_captioner), run_root=str(run_root), sources=[str(folder)])
    results = run_pipeline(config)
    assert [r.stage for r in results] == ["crawl", "segment", "caption", "build-corpus"]
    assert all(not r.failed_shards for r in results)
    return run_root, folder


def plan_json(run_root, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["plan", "--run-root", str(run_root), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_configs_fingerprint_the_same_after_a_snapshot_round_trip():
    config = RunConfig(run_root="/tmp/x")
    reloaded = load_run_config(None, base=config.model_dump(mode="json"))
    assert stage_fingerprints(reloaded) == stage_fingerprints(config)


def test_plan_of_a_finished_run_is_empty_and_names_what_a_change_recomputes(full_run, capsys):
    run_root, _ = full_run
    assert all(not stage["recompute"] for stage in plan_json(run_root, capsys).values())
    changed = plan_json(run_root, capsys, "--set", "caption.prompts.version=ps3-v2")
    assert not changed["crawl"]["recompute"] and not changed["segment"]["recompute"]
    assert set(changed["caption"]["recompute"].values()) == {"config changed"}
    assert set(changed["build-corpus"]["recompute"].values()) == {"upstream shard recomputes"}
    assert len(changed["caption"]["recompute"]) == changed["caption"]["shards"] == 2
    forced = plan_json(run_root, capsys, "--force", "segment")
    assert not forced["crawl"]["recompute"]
    assert all(set(forced[s]["recompute"].values()) == {"forced"} for s in ("segment", "caption", "build-corpus"))


def test_caption_change_recomputes_caption_and_corpus_only(full_run, tmp_path, tiny_captioner):
    run_root, folder = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_root, copy)
    config = load_run_config(
        None,
        [*overrides_for(tiny_captioner), "caption.sampling.max_new_tokens=40"],
        run_root=str(copy),
        sources=[str(folder)],
    )
    computed = {r.stage: r.computed_shards for r in run_pipeline(config)}
    assert computed == {"crawl": 0, "segment": 0, "caption": 2, "build-corpus": 2}
    forced = {r.stage: r.computed_shards for r in run_pipeline(config, force=frozenset({"build-corpus"}))}
    assert forced == {"crawl": 0, "segment": 0, "caption": 0, "build-corpus": 2}


def test_trace_follows_a_region_back_to_its_source(full_run, capsys, tiny_captioner):
    run_root, folder = full_run
    layout = RunLayout(Storage(str(run_root)))
    pairs = pq.read_table(next((run_root / "dataset" / "pairs").rglob("*.parquet"))).to_pylist()
    region_id = pairs[0]["region_id"]
    capsys.readouterr()
    assert main(["trace", region_id, "--run-root", str(run_root)]) == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["region"]["region_id"] == region_id
    assert trace["crawl"]["source_ref"].startswith(str(folder))
    assert (
        trace["crawl"]["config_fingerprint"]
        == layout.manifests("crawl")[trace["segment"]["shard_id"]].config_fingerprint
    )
    kinds = {c["kind"]: c for c in trace["captions"]}
    assert kinds["local"]["text"] == pairs[0]["caption"]
    assert kinds["local"]["prompt_version"] == "ps3-v1" and kinds["local"]["model"] == str(tiny_captioner)
    assert trace["corpus"]["in_corpus"] and trace["corpus"]["dataset_shard"].startswith("dataset/")
    assert main(["trace", "0" * 32, "--run-root", str(run_root)]) == 2


def test_conservation_check_passes_and_catches_lost_and_duplicated_items(full_run, tmp_path, capsys):
    run_root, _ = full_run
    assert main(["status", str(run_root), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(run_root, broken)
    layout = RunLayout(Storage(str(broken)))
    entry = sorted(layout.manifests("caption").values(), key=lambda e: e.shard_id)[0]
    captions = pq.read_table(broken / entry.output_key)
    # Lose one caption row, duplicate another: both must be reported.
    pq.write_table(captions.slice(1), broken / entry.output_key)
    segment_entry = layout.manifests("segment")[entry.shard_id]
    regions = pq.read_table(broken / segment_entry.output_key)
    pq.write_table(pa.concat_tables([regions, regions.slice(0, 1)]), broken / segment_entry.output_key)
    assert main(["status", str(broken), "--check"]) == 1
    out = capsys.readouterr().out
    assert "caption/" in out and "lost" in out
    assert "segment/" in out and "duplicated" in out


def test_every_item_of_the_bad_input_zoo_is_accounted_for_in_every_stage(zoo, tmp_path, tiny_captioner, capsys):
    """The whole pipeline over the crawl zoo (bad HTTP answers, broken images, duplicates): no item lost."""
    from tests.support.zoo import ZOO_CRAWL_OVERRIDES, ZOO_EXPECTED

    urls = tmp_path / "zoo.txt"
    urls.write_text("\n".join(zoo.urls()) + "\n")
    overrides = [o for o in overrides_for(tiny_captioner) if not o.startswith("crawl.min_")]
    config = load_run_config(
        None,
        [*overrides, *ZOO_CRAWL_OVERRIDES, "crawl.shard_size=8", "segment.mask_max_side=384"],
        run_root=str(tmp_path / "run"),
        sources=[str(urls)],
    )
    results = {r.stage: r for r in run_pipeline(config)}
    crawl = results["crawl"]
    assert crawl.kept_rows + crawl.error_rows == len(ZOO_EXPECTED)
    assert crawl.errors_by_reason and crawl.filtered_by_reason
    assert results["build-corpus"].kept_rows > 0
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run"), "--check"]) == 0
    assert "OK" in capsys.readouterr().out

"""Pipelined run vs stage by stage (issue 15 item 3): wall time against the sum and the max of the stages.

Run:  .venv/bin/python benchmarks/pipelined_run.py --images 96 --segment-ms 150 --caption-ms 25 --write-docs

Both runs use the same local Ray, the same generated JPEGs served on loopback and the fixed-cost fake
models of ``benchmarks/pipeline_overhead.py`` (segment sleeps ``--segment-ms`` per image, caption
``--caption-ms`` per request); crawl, dedup, the caption CPU phase, corpus rows, packing and all shard I/O
are the project's code. First ``run_pipeline`` with ``executor.pipelined=false`` (each stage to its end,
timed per stage as ``StageRunResult.wall_s``), then with ``executor.pipelined=true`` into a fresh run root
(one wall for the whole run). Target (issue 15): pipelined wall <= 1.2 x the slowest stage's wall. Both
runs must give the same images in the packed dataset, or the script fails. An untimed pipelined warm-up
run over ``--warmup-images`` comes first (Ray worker start-up, imports).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq

from benchmarks.crawl import ensure_images, parse_side
from benchmarks.pipeline_overhead import fake_models, pipeline_config, start_ray
from benchmarks.proctree import wait_for_quiet
from benchmarks.report import machine_description, replace_doc_section
from ps3_engine.infra.static_server import serve_directory
from ps3_engine.pipeline.runner import StageRunResult, run_pipeline

logger = logging.getLogger("benchmarks.pipelined_run")
DOC_TITLE = "Pipelined run vs stage by stage (benchmarks/pipelined_run.py)"


def parse_args() -> argparse.Namespace:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--side", type=parse_side, default=(2048, 1536), help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--shard-size", type=int, default=4, help="crawl shard size (every later stage follows)")
    parser.add_argument("--wave-shards", type=int, default=2, help="crawl.dedup_wave_shards")
    parser.add_argument("--segment-ms", type=float, default=150.0, help="fake segmenter cost per image")
    parser.add_argument("--caption-ms", type=float, default=25.0, help="fake captioner cost per request")
    parser.add_argument("--caption-batch-size", type=int, default=8, help="images per captioner call")
    parser.add_argument("--segment-actors", type=int, default=1, help="segment.max_workers")
    parser.add_argument("--caption-actors", type=int, default=1, help="caption.max_workers")
    parser.add_argument("--crawl-workers", type=int, default=max(1, cores - 1), help="crawl.max_workers")
    parser.add_argument("--warmup-images", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ps3-bench-crawl"), help="generated JPEGs")
    parser.add_argument("--quiet-wait", type=float, default=300, help="max seconds to wait for an idle machine")
    parser.add_argument("--write-docs", action="store_true")
    return parser.parse_args()


def config_for(run_root: Path, url_list: Path, args: argparse.Namespace, pipelined: bool):
    base = pipeline_config(run_root, url_list, args)
    crawl = base.crawl.model_copy(update={"dedup_wave_shards": args.wave_shards, "max_workers": args.crawl_workers})
    executor = base.executor.model_copy(update={"pipelined": pipelined})
    return base.model_copy(update={"crawl": crawl, "executor": executor})


def dataset_images(run_root: Path) -> list[str]:
    files = sorted((run_root / "dataset" / "images").rglob("*.parquet"))
    return sorted(i for f in files for i in pq.read_table(f, columns=["image_id"])["image_id"].to_pylist())


def timed(config) -> tuple[float, list[StageRunResult]]:
    began = time.perf_counter()
    results = run_pipeline(config)
    wall = time.perf_counter() - began
    for result in results:
        if result.failed_shards:
            raise RuntimeError(f"{result.stage}: failed shards {result.failed_shards}")
    return wall, results


def commit_times(run_root: Path, began: float) -> dict[str, tuple[float, float]]:
    """Per shard stage: seconds from ``began`` (epoch) to its first and its last shard commit."""
    found = {}
    for stage in ("crawl", "segment", "caption", "corpus"):
        stamps = [
            datetime.fromisoformat(json.loads(p.read_text())["created_at"]).timestamp() - began
            for p in (run_root / stage / "_manifest").glob("*.json")
        ]
        if stamps:
            found[stage] = (min(stamps), max(stamps))
    return found


def timeline(found: dict[str, tuple[float, float]]) -> str:
    rows = [f"| {stage} | {first:.1f} | {last:.1f} |" for stage, (first, last) in found.items()]
    return "\n".join(["| pipelined: shard stage | first commit (s) | last commit (s) |", "|---|---:|---:|", *rows])


def report(args: argparse.Namespace, by_stage: list[StageRunResult], staged_wall: float, wall: float) -> str:
    stage_walls = {r.stage: r.wall_s for r in by_stage}
    slowest = max(stage_walls, key=stage_walls.get)
    total = sum(stage_walls.values())
    lines = [
        "| run | wall (s) |",
        "|---|---:|",
        *(f"| stage by stage: {stage} | {seconds:.1f} |" for stage, seconds in stage_walls.items()),
        f"| stage by stage: whole run | {staged_wall:.1f} |",
        f"| **pipelined: whole run** | **{wall:.1f}** |",
        "",
        f"Pipelined wall / slowest stage ({slowest}) = **{wall / stage_walls[slowest]:.2f}x** (target <= 1.2x); "
        f"pipelined / sum of the stages = {wall / total:.2f}x; stage-by-stage run / sum = {staged_wall / total:.2f}x.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    paths = ensure_images(args.cache_dir, args.images, *args.side)
    load = wait_for_quiet(max_wait_s=args.quiet_wait)
    start_ray()
    with (
        tempfile.TemporaryDirectory(prefix="ps3-bench-pipelined-") as tmp,
        serve_directory(paths[0].parent) as url,
    ):
        work = Path(tmp)
        stats = work / "fake-model-logs"
        stats.mkdir()
        with fake_models(args, stats, None):
            lists = {}
            for name, count in (("warmup", args.warmup_images), ("timed", len(paths))):
                lists[name] = work / f"{name}-urls.txt"
                lists[name].write_text("".join(f"{url}/{p.name}\n" for p in paths[:count]))
            if args.warmup_images:
                timed(config_for(work / "warmup", lists["warmup"], args, pipelined=True))
            staged_wall, by_stage = timed(config_for(work / "staged", lists["timed"], args, pipelined=False))
            began = time.time()
            wall, _ = timed(config_for(work / "pipelined", lists["timed"], args, pipelined=True))
            commits = commit_times(work / "pipelined", began)
            if dataset_images(work / "staged") != dataset_images(work / "pipelined"):
                raise RuntimeError("the pipelined run's dataset differs from the stage-by-stage run's")
            images = len(dataset_images(work / "pipelined"))
    import ray

    ray.shutdown()
    table = report(args, by_stage, staged_wall, wall) + "\n\n" + timeline(commits)
    print(table)
    if args.write_docs:
        command = (
            f".venv/bin/python benchmarks/pipelined_run.py --images {args.images} --side {args.side[0]}x{args.side[1]} "
            f"--segment-ms {args.segment_ms:g} "
            f"--caption-ms {args.caption_ms:g} --shard-size {args.shard_size} --wave-shards {args.wave_shards} "
            "--write-docs"
        )
        body = "\n".join(
            [
                f"Command: `{command}`",
                "",
                machine_description() + f" Load before the run: {load:.1f} busy cores.",
                "",
                f"{args.images} generated {args.side[0]}x{args.side[1]} JPEGs on loopback ({images} in the dataset "
                f"of both runs), shards of {args.shard_size}, dedup waves of {args.wave_shards} shards, "
                f"{args.crawl_workers} crawl workers, {args.segment_actors} segment and {args.caption_actors} "
                f"caption actors; fake segment {args.segment_ms:g} ms/image, fake caption {args.caption_ms:g} "
                "ms/request. Both runs on one local Ray, after an untimed warm-up.",
                "",
                table,
            ]
        )
        replace_doc_section(Path("docs/benchmarks.md"), DOC_TITLE, body)


if __name__ == "__main__":
    main()

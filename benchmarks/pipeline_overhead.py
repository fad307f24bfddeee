"""Pipeline overhead: crawl -> segment -> caption -> build-corpus on Ray, with fixed-cost fake models.

Run:  .venv/bin/python benchmarks/pipeline_overhead.py --images 256 --segment-ms 1000 --caption-ms 40 --write-docs

The whole pipeline runs on a local Ray over generated 4K JPEGs (``benchmarks/crawl.py``'s generator and
cache) served on loopback. Segment and caption get fake models (``benchmarks/fakes.py``): the segmenter
sleeps ``--segment-ms`` per image, the captioner ``--caption-ms`` per request (4 boxes + 1 global per
image); everything else is the project's code. The fakes are injected by swapping
``pipeline.runner.stage_specs`` in this (driver) process; Ray workers import ``benchmarks.fakes`` through
``PYTHONPATH`` set in Ray's runtime env. Stages run one after another through ``pipeline.runner``'s
``run_*`` functions (what ``run_pipeline`` does), each timed from the driver.

Per model stage: busy fraction = seconds inside the fake model (summed over actors) / (stage wall seconds x
model actors); per-image overhead = (wall - model seconds per actor) / images. The goal is a busy
fraction >= 0.9. A profile splits each model stage's actor-seconds into model, the rest of the stage's
batch code on the actor, the caption CPU phase when it ran on the actor, and the rest (actor start-up,
shard read and commit, waiting for input).

Layouts, each timed after its own warm-up run: ``as-built`` (default) declares the fake model actors as
the stages do on a GPU-less cluster (1 CPU, no GPU); ``--layout unfused`` adds a Ray memory request to the
model actors, so their remote args differ from the caption CPU phase's the way a GPU request makes them
differ. With equal remote args Ray Data fuses the CPU-phase operator into the model actor pool; the script
detects this from the process ids in the fakes' logs and says so (pipeline/executor.py has prevented it
since commit c0435c1 by giving the CPU phase a memory request of its own).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ps3_engine.pipeline.runner as runner
from benchmarks.crawl import ensure_images, parse_side
from benchmarks.fakes import FakeCaptionConfig, FakeCaptionStage, FakeSegmentConfig, FakeSegmentStage, read_records
from benchmarks.proctree import machine_busy_s, wait_for_quiet
from benchmarks.report import machine_description, replace_doc_section
from ps3_engine.infra.static_server import serve_directory
from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.runner import STAGE_ORDER, STAGE_RUNNERS, StageRunResult
from ps3_engine.pipeline.shard_runner import StageSpec

logger = logging.getLogger("benchmarks.pipeline_overhead")
REPO = Path(__file__).resolve().parent.parent
MODEL_STAGES = ("segment", "caption")
TARGET = 0.9
LAYOUTS = {
    "as-built": "model actors as the stages declare them (1 CPU, no GPU)",
    "unfused": "model actors with a Ray memory request (remote args differ from the CPU phase's, as a GPU's do)",
}


@dataclass(frozen=True)
class StageTiming:
    stage: str
    start: float  # time.time(), comparable with the fakes' interval logs
    end: float
    result: StageRunResult
    machine_busy_s: float  # busy CPU-seconds of the whole machine during the stage (ours and any other)

    @property
    def wall_s(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class ModelStageStats:
    stage: str
    wall_s: float
    images: int
    actors: int
    model_s: float  # inside the fake model, summed over actors
    batch_s: float  # inside the stage's process_batch on the actors (model included)
    prepare_s: float  # caption: the CPU phase, in its own operator
    startup_s: float  # stage start -> first model call
    tail_s: float  # last model call -> stage end
    active_s: float  # first model call -> last model call

    @property
    def busy_fraction(self) -> float:
        return self.model_s / (self.wall_s * self.actors)

    @property
    def steady_fraction(self) -> float:
        return self.model_s / (self.active_s * self.actors)

    @property
    def overhead_ms_per_image(self) -> float:
        return (self.wall_s - self.model_s / self.actors) / self.images * 1000


@dataclass(frozen=True)
class LayoutRun:
    layout: str
    timings: list[StageTiming]
    stats: dict[str, ModelStageStats]
    fused: bool  # the caption CPU phase ran inside the model actors


def pipeline_config(run_root: Path, url_list: Path, args: argparse.Namespace) -> RunConfig:
    overrides = [
        "crawl.http.allow_private_addresses=true",  # the server is on loopback
        f"crawl.shard_size={args.shard_size}",
        f"segment.max_workers={args.segment_actors}",
        f"caption.max_workers={args.caption_actors}",
        f"caption.batch_size={args.caption_batch_size}",
        "caption.model=fixed-cost-fake",
        "executor.kind=ray",
        "executor.progress=false",
    ]
    return load_run_config(None, overrides, run_root=str(run_root), sources=[str(url_list)])


@contextmanager
def fake_models(args: argparse.Namespace, stats_dir: Path, actor_memory_mb: int | None) -> Iterator[None]:
    """Swap the segment and caption specs for the fixed-cost fakes (driver side; specs travel pickled)."""
    original: Callable[[RunConfig], dict[str, StageSpec]] = runner.stage_specs
    fake = {"fake_stats_dir": str(stats_dir), "actor_memory_mb": actor_memory_mb}

    def specs(config: RunConfig) -> dict[str, StageSpec]:
        found = original(config)
        segment = {**found["segment"].config.model_dump(), **fake, "fake_model_ms": args.segment_ms}
        caption = {**found["caption"].config.model_dump(), **fake, "fake_model_ms": args.caption_ms}
        found["segment"] = StageSpec(FakeSegmentStage, FakeSegmentConfig.model_validate(segment))
        found["caption"] = StageSpec(FakeCaptionStage, FakeCaptionConfig.model_validate(caption))
        return found

    runner.stage_specs = specs
    try:
        yield
    finally:
        runner.stage_specs = original


def run_stages(config: RunConfig) -> list[StageTiming]:
    """Each stage in order through ``pipeline.runner``'s run_* functions; fail loudly on any lost item."""
    timings = []
    for stage in STAGE_ORDER:
        start, busy = time.time(), machine_busy_s()
        result = STAGE_RUNNERS[stage](config)
        timings.append(StageTiming(stage, start, time.time(), result, machine_busy_s() - busy))
        logger.info("%s: %.1f s, %d rows in, %d out", stage, timings[-1].wall_s, result.input_rows, result.output_rows)
        if result.failed_shards or result.error_rows:
            raise RuntimeError(f"{stage}: failed shards {result.failed_shards}, errors {result.errors_by_reason}")
    return timings


def model_stage_stats(timing: StageTiming, records: list[dict]) -> ModelStageStats:
    inside = [r for r in records if r["stage"] == timing.stage and timing.start <= r["start"] <= timing.end]
    model = [r for r in inside if r["kind"] == "model"]
    if not model:
        raise RuntimeError(f"{timing.stage}: no fake-model calls were logged (did the workers import the fakes?)")

    def total(kind: str) -> float:
        return sum(r["end"] - r["start"] for r in inside if r["kind"] == kind)

    first, last = min(r["start"] for r in model), max(r["end"] for r in model)
    return ModelStageStats(
        stage=timing.stage,
        wall_s=timing.wall_s,
        images=timing.result.input_rows,
        actors=len({r["pid"] for r in model}),
        model_s=total("model"),
        batch_s=total("batch"),
        prepare_s=total("prepare"),
        startup_s=first - timing.start,
        tail_s=timing.end - last,
        active_s=last - first,
    )


def stage_table(timings: list[StageTiming], stats: dict[str, ModelStageStats], images: int) -> str:
    lines = [
        "| stage | wall (s) | images in | model actors | model s (sum) | busy fraction | busy, first to last "
        "model call | start-up (s) | tail (s) | overhead per image (ms) | machine busy (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for timing in timings:
        s = stats.get(timing.stage)
        rows = timing.result.input_rows
        busy = f"{timing.machine_busy_s / timing.wall_s:.2f}"
        if s is None:
            overhead = timing.wall_s / max(rows, 1) * 1000
            lines.append(
                f"| {timing.stage} | {timing.wall_s:.1f} | {rows} | - | - | - | - | - | - | {overhead:.0f} | {busy} |"
            )
            continue
        lines.append(
            f"| {s.stage} | {s.wall_s:.1f} | {s.images} | {s.actors} | {s.model_s:.1f} | **{s.busy_fraction:.3f}** | "
            f"{s.steady_fraction:.3f} | {s.startup_s:.1f} | {s.tail_s:.1f} | {s.overhead_ms_per_image:.0f} | {busy} |"
        )
    wall = timings[-1].end - timings[0].start
    model_per_actor = sum(s.model_s / s.actors for s in stats.values())
    lines.append(
        f"| whole pipeline | {wall:.1f} | {images} | | {sum(s.model_s for s in stats.values()):.1f} | | | | | "
        f"{(wall - model_per_actor) / images * 1000:.0f} | |"
    )
    return "\n".join(lines)


def profile_table(stats: dict[str, ModelStageStats], fused: bool) -> str:
    """Where each model stage's actor-seconds (wall x actors) went."""
    lines = [
        "| stage | actor-seconds | in the model | rest of process_batch on the actor | caption CPU phase | "
        "other time on the actors (start-up, shard read/commit, waiting for input) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in stats.values():
        available = s.wall_s * s.actors
        rest = s.batch_s - s.model_s
        on_actor = s.prepare_s if fused else 0.0
        outside = available - s.batch_s - on_actor
        if not s.prepare_s:
            prepare = "-"
        else:
            where = "on the model actor" if fused else "own Ray tasks, not actor time"
            prepare = f"{s.prepare_s:.1f} s ({s.prepare_s / s.images * 1000:.0f} ms/image, {where})"
        lines.append(
            f"| {s.stage} | {available:.1f} | {s.model_s:.1f} ({s.model_s / available:.0%}) | {rest:.1f} "
            f"({rest / available:.0%}, {rest / s.images * 1000:.0f} ms/image) | {prepare} | {outside:.1f} "
            f"({outside / available:.0%}) |"
        )
    return "\n".join(lines)


def verdict(stats: dict[str, ModelStageStats]) -> str:
    parts = []
    for s in stats.values():
        status = "met" if s.busy_fraction >= TARGET else "**missed**"
        parts.append(f"{s.stage} {s.busy_fraction:.3f} ({status})")
    return f"busy fraction of the model actors, goal >= {TARGET}: " + "; ".join(parts) + "."


def parse_args() -> argparse.Namespace:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=parse_side, default=(3840, 2160), help="WIDTHxHEIGHT (default 3840x2160)")
    parser.add_argument("--shard-size", type=int, default=16, help="crawl shard size (every later stage follows)")
    parser.add_argument(
        "--segment-ms", type=float, default=1000.0, help="fake segmenter cost per image (SAM2 AMG, paper settings)"
    )
    parser.add_argument("--caption-ms", type=float, default=40.0, help="fake captioner cost per request")
    parser.add_argument("--caption-batch-size", type=int, default=8, help="images per captioner call")
    parser.add_argument("--segment-actors", type=int, default=cores, help="segment.max_workers")
    parser.add_argument(
        "--caption-actors", type=int, default=max(1, cores - 1), help="caption.max_workers (other cores: CPU phase)"
    )
    parser.add_argument("--warmup-images", type=int, default=8, help="untimed pipeline run first (0: none)")
    parser.add_argument(
        "--layout", dest="layouts", action="append", choices=list(LAYOUTS), help="repeatable; default: as-built"
    )
    parser.add_argument("--actor-memory-mb", type=int, default=1024, help="memory request of 'unfused' model actors")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ps3-bench-crawl"), help="generated JPEGs")
    parser.add_argument("--quiet-wait", type=float, default=600, help="max seconds to wait for an idle machine")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    args.layouts = args.layouts or ["as-built"]
    return args


def start_ray() -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # so workers can import benchmarks.fakes
    )


def run_layout(args: argparse.Namespace, layout: str, base_url: str, paths: list[Path], work: Path) -> LayoutRun:
    """A timed pipeline run (after an untimed warm-up run) with the model actors declared per ``layout``."""
    stats_dir = work / layout / "fake-model-logs"
    stats_dir.mkdir(parents=True)
    memory = args.actor_memory_mb if layout == "unfused" else None
    with fake_models(args, stats_dir, memory):
        for name, count in (("warmup", args.warmup_images), ("timed", len(paths))):
            if not count:
                continue
            url_list = work / layout / f"{name}-urls.txt"
            url_list.write_text("".join(f"{base_url}/{path.name}\n" for path in paths[:count]))
            for stale in stats_dir.glob("*.jsonl"):
                stale.unlink()
            logger.info("%s: %s pipeline run of %d images", layout, name, count)
            timings = run_stages(pipeline_config(work / layout / f"{name}-run", url_list, args))
    records = read_records(stats_dir)
    stats = {t.stage: model_stage_stats(t, records) for t in timings if t.stage in MODEL_STAGES}
    return LayoutRun(layout, timings, stats, cpu_phase_on_model_actor(records))


def cpu_phase_on_model_actor(records: list[dict]) -> bool:
    """Whether the caption CPU phase ran in the model actors' processes (Ray Data fused the operators)."""
    model = {r["pid"] for r in records if r["stage"] == "caption" and r["kind"] == "model"}
    prepare = {r["pid"] for r in records if r["stage"] == "caption" and r["kind"] == "prepare"}
    return bool(prepare) and prepare <= model


def layout_section(run: LayoutRun, images: int) -> list[str]:
    caption_phase = (
        "the caption CPU phase ran inside the model actor (Ray Data fused the two operators)"
        if run.fused
        else "the caption CPU phase ran in its own Ray tasks"
    )
    return [
        f"**{run.layout}**: {LAYOUTS[run.layout]}; {caption_phase}.",
        "",
        stage_table(run.timings, run.stats, images),
        "",
        "Where the model stages' actor-seconds went:",
        "",
        profile_table(run.stats, run.fused),
        "",
        f"Result ({run.layout}): " + verdict(run.stats),
        "",
    ]


def segment_note(runs: list[LayoutRun], segment_ms: float) -> list[str]:
    """The bound the segment stage's on-actor image work puts on its busy fraction, from the measurements."""
    rest = [(r.stats["segment"].batch_s - r.stats["segment"].model_s) / r.stats["segment"].images for r in runs]
    rest_ms = sum(rest) / len(rest) * 1000
    return [
        f"Segment: besides the model, each actor spends about {rest_ms:.0f} ms per image inside `process_batch` "
        "(decoding the 1024 px working copy from the 4K JPEG, scoring and selecting boxes, building rows): the "
        "segment stage has no CPU phase, so this runs on the model actor. It caps the busy fraction at about "
        f"model / (model + {rest_ms:.0f} ms) before start-up and shard I/O: "
        f"{segment_ms / (segment_ms + rest_ms):.2f} at {segment_ms:g} ms per image, and below 0.9 for a "
        f"segmenter faster than about {9 * rest_ms:.0f} ms per image.",
        "",
    ]


def fusion_note(runs: list[LayoutRun]) -> list[str]:
    if not any(run.fused for run in runs):
        return []
    return [
        "Why the layouts differ: `RayDataExecutor.run` (pipeline/executor.py) maps the caption CPU phase "
        "(`_prepare_tasks`, a task pool with `num_cpus=1`) and then the model (`ShardWorker`, an actor pool). "
        "When the model actors' Ray remote args equal the CPU phase's (`num_cpus=1`, no GPU: CPU-only "
        "backends and these fakes), Ray Data's operator fusion merges the two into one "
        "`ActorPoolMapOperator[MapBatches(_prepare_tasks)->MapBatches(ShardWorker)]`: the CPU phase then runs "
        "on the model actor, one shard after the other with the model, and no core works ahead. With a GPU "
        "request (or, here, a memory request) the args differ and the operators stay apart, as designed. "
        "Ray Data never fuses an operator that has a `ray_remote_args_fn`, so giving the CPU-phase "
        "`map_batches` one (returning `{'num_cpus': 1}`) keeps the phases apart on CPU-only clusters too "
        "(checked on Ray 2.60 with a two-operator dataset).",
        "",
    ]


def doc_body(args: argparse.Namespace, runs: list[LayoutRun], load: float) -> str:
    flags = "".join(f" --layout {layout}" for layout in args.layouts)
    if "unfused" in args.layouts:
        flags += f" --actor-memory-mb {args.actor_memory_mb}"
    return "\n".join(
        [
            f"Command: `.venv/bin/python benchmarks/pipeline_overhead.py --images {args.images} --side "
            f"{args.side[0]}x{args.side[1]} --shard-size {args.shard_size} --segment-ms {args.segment_ms:g} "
            f"--caption-ms {args.caption_ms:g} --caption-batch-size {args.caption_batch_size} --segment-actors "
            f"{args.segment_actors} --caption-actors {args.caption_actors} --warmup-images {args.warmup_images}"
            f"{flags} --write-docs`",
            "",
            machine_description() + f" Background load before the run (after waiting up to {args.quiet_wait:g} s "
            f"for an idle machine): {load:.1f} busy cores; machine busy per stage counts every process. "
            f"Python {sys.version.split()[0]}.",
            "",
            *[line for run in runs for line in layout_section(run, args.images)],
            *segment_note(runs, args.segment_ms),
            *fusion_note(runs),
            f"Set-up: {args.images} generated JPEGs of {args.side[0]}x{args.side[1]} on a loopback server in the "
            f"driver process, crawl shards of {args.shard_size} images, local Ray with num_cpus={os.cpu_count()} "
            f"started beforehand; each layout is timed after an untimed warm-up pipeline run of "
            f"{args.warmup_images} images. Fake models (`benchmarks/fakes.py`): segment sleeps {args.segment_ms:g} "
            f"ms per image and returns a fixed mask set, in an actor pool of up to {args.segment_actors} (1 CPU "
            f"each, as SAM2 declares on a GPU-less cluster); caption sleeps {args.caption_ms:g} ms per request "
            f"(4 boxes + 1 global = 5 per image), {args.caption_batch_size} images per call, up to "
            f"{args.caption_actors} actor(s), the CPU phase on the remaining cores. The rest is the real stage and "
            "executor code. Busy fraction = model seconds / (stage wall x model actors, counted as the processes "
            "that ran the model); 'busy, first to last model call' leaves out the stage's start-up (planning, Ray "
            "Data start, actor creation and setup, first shard read) and tail (last commit, summary). Overhead "
            "per image = (stage wall - model seconds per actor) / images; the whole-pipeline row subtracts both "
            "model stages' per-actor model time from the end-to-end wall.",
        ]
    )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # 16 threads > the 8-connection pool
    paths = ensure_images(args.cache_dir, args.images, *args.side)
    load = wait_for_quiet(max_wait_s=args.quiet_wait)
    if load >= 0.3:
        logger.warning("the machine is busy (%.1f cores) before the run; timings will be low", load)
    start_ray()
    with tempfile.TemporaryDirectory(prefix="ps3-bench-pipeline-") as tmp, serve_directory(paths[0].parent) as url:
        runs = [run_layout(args, layout, url, paths, Path(tmp)) for layout in args.layouts]
    import ray

    ray.shutdown()
    for run in runs:
        print("\n".join(layout_section(run, args.images)))
    if args.write_docs:
        body = doc_body(args, runs, load)
        replace_doc_section(Path("docs/benchmarks.md"), "Pipeline overhead (benchmarks/pipeline_overhead.py)", body)


if __name__ == "__main__":
    main()

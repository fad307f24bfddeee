"""Crawl-stage benchmark: images/s and MB/s crawling generated 4K JPEGs from a loopback HTTP server.

Run:  .venv/bin/python benchmarks/crawl.py --images 500 --write-docs

The same run measures the decode-only floor: one process, one thread, reading the same files from disk
and decoding them (a) fully, as a later stage would, and (b) exactly as the crawl validates them
(``stages.imaging.inspect_image``: JPEG draft-mode decode at >= 256 px plus the 64-bit pHash). Each crawl
measurement times ``run_crawl`` end to end on a fresh local run root (planning, fetch, validation,
hashing, Parquet commit, cross-shard dedup, summary), then checks that every image was kept.

The loopback server (``infra.static_server``) runs in this process and shares the CPU with the crawl,
so crawl numbers include the cost of serving the bytes. Per-core figures divide crawl throughput by all
cores of the machine (both executors use every core: threads release the GIL in decode, hashing and
socket I/O) and the floors by one.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine_description, replace_doc_section
from ps3_engine.infra.static_server import serve_directory
from ps3_engine.infra.storage import Storage
from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.pipeline.runner import run_crawl
from ps3_engine.stages.crawl import CrawlConfig
from ps3_engine.stages.imaging import inspect_image, to_rgb

logger = logging.getLogger("benchmarks.crawl")
GENERATOR_VERSION = "v1"  # bump when synth_jpeg changes, so cached files are regenerated
JPEG_QUALITY = 90
TARGET_RATIO = 0.5
FULL_FLOOR = "decode floor: full decode"
CRAWL_FLOOR = "decode floor: crawl's validation decode"
LOCAL_LABEL = "crawl, in-process executor"
RAY_LABEL = "crawl, Ray Data executor"


@dataclass(frozen=True)
class Measurement:
    mode: str
    num_images: int
    seconds: float
    num_bytes: int
    num_cores: int  # per-core throughput divides by this
    busy_cores: float  # average busy cores of the whole machine while measuring
    own_cpu_s: float  # CPU seconds of this process and its descendants (server, Ray) while measuring
    batch_s: float | None = None  # crawl only: seconds inside the stage's batches, summed over shards

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds

    @property
    def per_core(self) -> float:
        return self.images_per_s / self.num_cores

    @property
    def per_cpu_s(self) -> float:
        return self.num_images / self.own_cpu_s


def synth_jpeg(seed: int, width: int, height: int) -> bytes:
    """A varied photo-like 4K JPEG: a gradient, a few flat shapes, then luma and colour noise."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi)
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    t = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    t = (t - t.min()) / (t.max() - t.min())
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for _ in range(rng.integers(4, 10)):
        size = int(rng.integers(short // 10, short // 3))
        x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + size, y0 + size], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    sigma = rng.uniform(3.0, 7.0)
    luma = rng.normal(0, sigma, (height, width)).astype(np.float32)
    pixels = np.asarray(img, dtype=np.float32) + luma[..., None]
    chroma = rng.normal(0, sigma / 3, (-(-height // 4), -(-width // 4), 3)).astype(np.float32)
    pixels += chroma.repeat(4, 0).repeat(4, 1)[:height, :width]
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _write_one(job: tuple[Path, int, int, int]) -> int:
    path, seed, width, height = job
    if not path.exists():
        partial = path.with_suffix(".part")
        partial.write_bytes(synth_jpeg(seed, width, height))
        partial.rename(path)
    return path.stat().st_size


def ensure_images(cache_dir: Path, count: int, width: int, height: int) -> list[Path]:
    """Generate (or reuse) ``count`` JPEGs under ``cache_dir``; encoding runs on every core."""
    folder = cache_dir / f"{GENERATOR_VERSION}-{width}x{height}-q{JPEG_QUALITY}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img-{index:05d}.jpg" for index in range(count)]
    jobs = [(path, index, width, height) for index, path in enumerate(paths)]
    missing = sum(not path.exists() for path in paths)
    logger.info("%d images in %s, %d to generate", count, folder, missing)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        sizes = list(tqdm(pool.map(_write_one, jobs), total=count, desc="generate", unit="img"))
    logger.info("image sizes: %.2f-%.2f MB, mean %.2f MB", min(sizes) / 1e6, max(sizes) / 1e6, np.mean(sizes) / 1e6)
    return paths


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of this process and each of its descendants, by pid, from /proc."""
    parents, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process exited meanwhile
            parents[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, frontier = {}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        tree[pid] = cpu.get(pid, 0.0)
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def background_load(seconds: float = 2.0) -> float:
    """Busy cores of the whole machine while this process sleeps: other work that would skew the timings."""
    before = cpu_busy_s()
    time.sleep(seconds)
    load = (cpu_busy_s() - before) / seconds
    if load > 0.2:
        logger.warning("the machine is already busy (%.1f cores) before measuring: timings will be low", load)
    return load


def timed(mode: str, paths: list[Path], num_cores: int, work: Callable[[], float | None]) -> Measurement:
    """Time ``work`` (which may return the crawl's in-batch seconds) and the machine's busy cores meanwhile."""
    own_before, busy_before, began = process_tree_cpu_s(), cpu_busy_s(), time.perf_counter()
    batch_s = work()
    seconds = time.perf_counter() - began
    busy = (cpu_busy_s() - busy_before) / seconds
    own_cpu_s = sum(cpu - own_before.get(pid, 0.0) for pid, cpu in process_tree_cpu_s().items())
    num_bytes = sum(path.stat().st_size for path in paths)
    measurement = Measurement(mode, len(paths), seconds, num_bytes, num_cores, busy, own_cpu_s, batch_s)
    logger.info(
        "%s: %.1f s, %.2f images/s, %.1f busy cores (%.1f of them ours)",
        mode,
        seconds,
        measurement.images_per_s,
        busy,
        own_cpu_s / seconds,
    )
    return measurement


def full_decode(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            img.load()
            to_rgb(img)


def crawl_decode(paths: list[Path]) -> None:
    config = CrawlConfig()
    formats = frozenset(config.allowed_formats)
    for path in paths:
        inspect_image(
            path.read_bytes(), content_type="image/jpeg", max_pixels=config.max_pixels, allowed_formats=formats
        )


def crawl_config(run_root: Path, url_list: Path, executor: str, shard_size: int) -> RunConfig:
    overrides = [
        "crawl.http.allow_private_addresses=true",  # the server is on loopback
        f"crawl.shard_size={shard_size}",
        f"executor.kind={executor}",
        "executor.progress=false",
    ]
    return load_run_config(None, overrides, run_root=str(run_root), sources=[str(url_list)])


def kept_images(run_root: Path) -> int:
    """Image rows committed under ``run_root`` that survived dedup, counted from the shards themselves."""
    layout = RunLayout(Storage(str(run_root)))
    dropped = layout.dropped_item_ids()
    return sum(
        sum(item not in dropped for item in layout.read_output("crawl", shard, ["item_id"]).column(0).to_pylist())
        for shard in layout.manifests("crawl")
    )


def crawl_once(config: RunConfig, expected: int) -> float:
    """Run the crawl, fail loudly unless every image was kept; returns the seconds spent inside batches."""
    result = run_crawl(config)
    kept = kept_images(Path(config.run_root))
    if result.failed_shards or result.error_rows or result.kept_rows != expected or kept != expected:
        raise RuntimeError(
            f"crawl of {expected} images under {config.run_root} kept {result.kept_rows} (rows counted: {kept}), "
            f"failed shards {result.failed_shards}, errors {result.errors_by_reason}, "
            f"filtered {result.filtered_by_reason}"
        )
    return result.busy_s


def _prepared(work_dir: Path, name: str, urls: list[str], executor: str, shard_size: int) -> RunConfig:
    url_list = work_dir / f"{name}-urls.txt"
    url_list.write_text("\n".join(urls) + "\n")
    return crawl_config(work_dir / f"{name}-run", url_list, executor, shard_size)


def measure_crawl(
    executor: str, paths: list[Path], base_url: str, work_dir: Path, shard_size: int, warmup: int
) -> Measurement:
    """Time one crawl of ``paths`` on a fresh run root, after an untimed warm-up crawl of ``warmup`` images.

    The warm-up pays one-off costs a long crawl amortises (Ray worker processes and their imports).
    """
    urls = [f"{base_url}/{path.name}" for path in paths]
    if warmup:
        config = _prepared(work_dir, f"{executor}-warmup", urls[:warmup], executor, shard_size)
        crawl_once(config, len(urls[:warmup]))
        shutil.rmtree(config.run_root)
    config = _prepared(work_dir, f"{executor}-timed", urls, executor, shard_size)
    label = LOCAL_LABEL if executor == "local" else RAY_LABEL
    measurement = timed(label, paths, os.cpu_count() or 1, lambda: crawl_once(config, len(urls)))
    shutil.rmtree(config.run_root)
    return measurement


def markdown_table(measurements: list[Measurement]) -> str:
    floors = {m.mode: m.per_core for m in measurements if m.mode in (FULL_FLOOR, CRAWL_FLOOR)}
    lines = [
        "| mode | images | seconds | images/s | MB/s | per-core images/s | ratio vs full-decode floor | "
        "ratio vs crawl-decode floor | own CPU (cores) | machine busy (cores) | images per own CPU-s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measurements:
        is_floor = m.mode in floors
        ratios = ["-" if is_floor else f"{m.per_core / floors[f]:.2f}" for f in (FULL_FLOOR, CRAWL_FLOOR)]
        lines.append(
            f"| {m.mode} | {m.num_images} | {m.seconds:.1f} | {m.images_per_s:.2f} | "
            f"{m.num_bytes / 1e6 / m.seconds:.1f} | {m.per_core:.2f} | {' | '.join(ratios)} | "
            f"{m.own_cpu_s / m.seconds:.1f} | {m.busy_cores:.1f} | {m.per_cpu_s:.1f} |"
        )
    return "\n".join(lines)


def verdict(measurements: list[Measurement]) -> str:
    """One sentence per crawl row: its per-core ratio to the crawl-decode floor against the target."""
    floor = next(m for m in measurements if m.mode == CRAWL_FLOOR)
    parts = []
    for m in measurements:
        if m.mode not in (FULL_FLOOR, CRAWL_FLOOR):
            ratio = m.per_core / floor.per_core
            status = "met" if ratio >= TARGET_RATIO else "missed"
            parts.append(
                f"{m.mode}: {ratio:.2f} x the crawl-decode floor per core (target {TARGET_RATIO} {status}); "
                f"per CPU-second actually used, {m.per_cpu_s / floor.per_cpu_s:.2f} x."
            )
    return " ".join(parts)


def in_process_split(measurements: list[Measurement]) -> str:
    """Where the in-process crawl's wall time went: inside batches vs the single-threaded rest."""
    for m in measurements:
        if m.mode == LOCAL_LABEL and m.batch_s is not None:
            return (
                f" In-process, {m.batch_s:.1f} s of the {m.seconds:.1f} s were spent inside the stage's batches "
                f"(fetch, validation, hashing; {CrawlConfig().download_threads} download threads); the rest is "
                "planning, the per-shard Parquet "
                "commit (serialise, write, checksum) and dedup, on one thread while no download runs."
            )
    return ""


def parse_side(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--side", type=parse_side, default=(3840, 2160), help="WIDTHxHEIGHT (default 3840x2160)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ps3-bench-crawl"), help="generated JPEGs")
    parser.add_argument(
        "--executor",
        choices=["ray", "local"],
        action="append",
        help="ray and/or local (in-process); repeat for both (default: both)",
    )
    parser.add_argument("--shard-size", type=int, default=CrawlConfig().shard_size)
    parser.add_argument("--warmup-images", type=int, default=8, help="untimed crawl before each timed one")
    parser.add_argument("--write-docs", action="store_true")
    return parser.parse_args()


def run_all(args: argparse.Namespace, executors: list[str], paths: list[Path]) -> list[Measurement]:
    measurements = [
        timed(FULL_FLOOR, paths, 1, lambda: full_decode(paths)),
        timed(CRAWL_FLOOR, paths, 1, lambda: crawl_decode(paths)),
    ]
    with tempfile.TemporaryDirectory(prefix="ps3-bench-crawl-") as work, serve_directory(paths[0].parent) as url:
        for executor in executors:
            if executor == "ray":  # started only now, so its idle daemons do not run during the other rows
                import ray

                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            measurements.append(measure_crawl(executor, paths, url, Path(work), args.shard_size, args.warmup_images))
    return measurements


def doc_body(args: argparse.Namespace, paths: list[Path], measurements: list[Measurement], load: float) -> str:
    sizes = [path.stat().st_size / 1e6 for path in paths]
    flags = "".join(f" --executor {e}" for e in args.executor or [])
    return "\n".join(
        [
            f"Command: `.venv/bin/python benchmarks/crawl.py --images {args.images} --side "
            f"{args.side[0]}x{args.side[1]}{flags} --shard-size {args.shard_size} --warmup-images "
            f"{args.warmup_images} --write-docs`",
            "",
            machine_description() + f" Background load before the run: {load:.1f} busy cores.",
            "",
            markdown_table(measurements),
            "",
            f"Images: {len(paths)} generated JPEGs of {args.side[0]}x{args.side[1]}, quality {JPEG_QUALITY} "
            f"(gradient, flat shapes, luma and chroma noise), {min(sizes):.2f}-{max(sizes):.2f} MB, "
            f"{sum(sizes):.0f} MB in all (MB = 10^6 bytes). Crawl rows time `run_crawl` end to end on a fresh "
            f"local run root (planning, HTTP fetch from a loopback `infra.static_server` in the same process, "
            f"validation, sha256 and pHash, Parquet commit with the image bytes, cross-shard dedup, summary), "
            f"default crawl settings with `shard_size={args.shard_size}`, after an untimed warm-up crawl of "
            f"{args.warmup_images} images; Ray is started beforehand with `num_cpus={os.cpu_count()}`. Every "
            "crawl was checked to keep all images. The server shares the CPU with the crawl, so the crawl rows "
            "pay for serving the bytes too. `own CPU` counts this process and its descendants (server, Ray "
            "daemons and workers); `machine busy` counts every process, so a gap between them is other load "
            "that competed for the cores.",
            "",
            "Floors: one process, one thread, files read from the page cache. `full decode` decodes every "
            "pixel (what a later stage's `load_rgb` does at full size); `crawl's validation decode` calls "
            "`stages.imaging.inspect_image` as the crawl does: libjpeg DCT-scaled (draft) decode to >= 256 px, "
            "which still entropy-decodes every byte, plus the pHash. Per-core divides crawl throughput by all "
            f"{os.cpu_count()} cores and the floors by one. Target: crawl per-core >= {TARGET_RATIO} x floor; "
            "the crawl-decode floor is the like-for-like comparison.",
            "",
            "Result: " + verdict(measurements) + in_process_split(measurements),
        ]
    )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The crawl's 16 download threads outnumber urllib3's per-host pool (8), so urllib3 warns on every
    # connection it cannot return to the pool; one line per image would bury the benchmark's own log.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    executors = args.executor or ["local", "ray"]
    paths = ensure_images(args.cache_dir, args.images, *args.side)
    load = background_load()
    measurements = run_all(args, executors, paths)
    print(markdown_table(measurements))
    logger.info("%s", verdict(measurements))
    if args.write_docs:
        body = doc_body(args, paths, measurements, load)
        replace_doc_section(Path("docs/benchmarks.md"), "Crawl stage (benchmarks/crawl.py)", body)


if __name__ == "__main__":
    main()

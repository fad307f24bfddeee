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
from infra.static_server import serve_directory
from infra.storage import Storage
from pipeline.config import RunConfig, load_run_config
from pipeline.layout import RunLayout
from pipeline.runner import run_crawl
from stages.crawl import CrawlConfig
from stages.imaging import inspect_image, to_rgb

logger = logging.getLogger("benchmarks.crawl")
GENERATOR_VERSION = "v1"  # bump when synth_jpeg changes, so cached files are regenerated
JPEG_QUALITY = 90
TARGET_RATIO = 0.5
FULL_FLOOR = "decode floor: full decode"
CRAWL_FLOOR = "decode floor: crawl's validation decode"


@dataclass(frozen=True)
class Measurement:
    mode: str
    num_images: int
    seconds: float
    num_bytes: int
    num_cores: int  # per-core throughput divides by this
    busy_cores: float  # average busy cores of the whole machine while measuring

    @property
    def images_per_s(self) -> float:
        return self.num_images / self.seconds

    @property
    def per_core(self) -> float:
        return self.images_per_s / self.num_cores


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
    logger.info(
        "image sizes: %.2f-%.2f MB, mean %.2f MB", min(sizes) / 1e6, max(sizes) / 1e6, np.mean(sizes) / 1e6
    )
    return paths


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(mode: str, paths: list[Path], num_cores: int, work: Callable[[], None]) -> Measurement:
    busy_before, began = cpu_busy_s(), time.perf_counter()
    work()
    seconds = time.perf_counter() - began
    busy = (cpu_busy_s() - busy_before) / seconds
    num_bytes = sum(path.stat().st_size for path in paths)
    measurement = Measurement(mode, len(paths), seconds, num_bytes, num_cores, busy)
    logger.info("%s: %.1f s, %.2f images/s, %.1f busy cores", mode, seconds, measurement.images_per_s, busy)
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


def crawl_once(config: RunConfig, expected: int) -> None:
    """Run the crawl and fail loudly unless every image was kept."""
    result = run_crawl(config)
    kept = kept_images(Path(config.run_root))
    if result.failed_shards or result.error_rows or result.kept_rows != expected or kept != expected:
        raise RuntimeError(
            f"crawl of {expected} images under {config.run_root} kept {result.kept_rows} (rows counted: {kept}), "
            f"failed shards {result.failed_shards}, errors {result.errors_by_reason}, "
            f"filtered {result.filtered_by_reason}"
        )


def measure_crawl(
    executor: str, paths: list[Path], base_url: str, work_dir: Path, shard_size: int, warmup: int
) -> Measurement:
    """Time one crawl of ``paths`` on a fresh run root, after an untimed warm-up crawl of ``warmup`` images."""
    urls = [f"{base_url}/{path.name}" for path in paths]
    for name, count in (("warmup", min(warmup, len(paths))), ("timed", len(paths))):
        if count == 0:
            continue
        url_list = work_dir / f"{executor}-{name}-urls.txt"
        url_list.write_text("\n".join(urls[:count]) + "\n")
        run_root = work_dir / f"{executor}-{name}-run"
        config = crawl_config(run_root, url_list, executor, shard_size)
        if name == "warmup":
            crawl_once(config, count)
        else:
            label = "crawl, in-process executor" if executor == "local" else "crawl, Ray Data executor"
            measurement = timed(label, paths, os.cpu_count() or 1, lambda config=config: crawl_once(config, count))
        shutil.rmtree(run_root)
    return measurement

"""The embedded default job: generated high-res images served on loopback, crawled on local Ray.

``ps3-engine demo`` builds the tiny local captioner (``training/tiny_captioner.py``, once), writes
sample scenes plus a few bad inputs into ``<out>/site``, serves them from a
loopback HTTP server, writes a URL list and runs the pipeline with ``<out>/run`` as its run root. The
crawl config opts in to loopback targets explicitly (refused by default).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from PIL import Image

from ps3_engine.infra.static_server import serve_directory
from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.runner import StageRunResult, run_pipeline
from ps3_engine.pipeline.samples import synthetic_scene, write_scenes

logger = logging.getLogger(__name__)


def _write_bad_inputs(site: Path) -> list[str]:
    """A small zoo of inputs that must end in the errors table, not in the corpus."""
    (site / "broken").mkdir(parents=True, exist_ok=True)
    small = io.BytesIO()
    synthetic_scene(640, 480, 99).save(small, "JPEG", quality=85)
    (site / "broken" / "small.jpg").write_bytes(small.getvalue())
    full = (site / "images" / "scene-00000.jpg").read_bytes()
    (site / "broken" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (site / "broken" / "empty.jpg").write_bytes(b"")
    (site / "broken" / "page.html").write_text("<html><body>not an image</body></html>")
    (site / "broken" / "copy-of-scene-0.jpg").write_bytes(full)
    return [
        "broken/small.jpg",
        "broken/truncated.jpg",
        "broken/empty.jpg",
        "broken/page.html",
        "broken/missing.jpg",
        "broken/copy-of-scene-0.jpg",
    ]


def prepare_site(out: Path, num_images: int) -> list[str]:
    site = out / "site"
    images = write_scenes(site / "images", num_images, size=(2400, 1600))
    relative = [f"images/{p.name}" for p in images]
    return relative + _write_bad_inputs(site)


# The tiny captioner sees small images: its processor works at 112x112, so send it no more.
DEMO_CAPTION_MAX_PIXELS = 112 * 112


def demo_config(out: Path, url_list: Path, executor: str, overrides: list[str], captioner: Path) -> RunConfig:
    defaults = [
        f"caption.model={captioner}",
        "caption.backend=transformers",
        "caption.transformers.device=cpu",
        f"caption.max_pixels={DEMO_CAPTION_MAX_PIXELS}",
        "caption.sampling.max_new_tokens=48",
        f"run_root={out / 'run'}",
        f"sources=[{url_list}]",
        "crawl.http.allow_private_addresses=true",
        "crawl.shard_size=8",
        # Batches smaller than the 8-image shards, so the console's item progress moves within a shard
        # (batch sizes are operational: not part of any fingerprint).
        "crawl.batch_size=4",
        "segment.batch_size=2",
        "caption.batch_size=2",
        "corpus.validation_fraction=0.2",
        f"executor.kind={executor}",
    ]
    return load_run_config(None, defaults + overrides)


def run_demo(
    out: Path, num_images: int = 24, executor: str = "ray", overrides: list[str] | None = None
) -> tuple[RunConfig, list[StageRunResult]]:
    out = out.resolve()
    paths = prepare_site(out, num_images)
    from ps3_engine.training.tiny_captioner import build_tiny_captioner

    captioner = build_tiny_captioner(out / "tiny-captioner")
    Image.init()
    with serve_directory(out / "site") as base_url:
        url_list = out / "urls.txt"
        url_list.write_text("".join(f"{base_url}/{p}\n" for p in paths))
        config = demo_config(out, url_list, executor, overrides or [], captioner)
        logger.info("demo: %d URLs served from %s; run root %s", len(paths), base_url, config.run_root)
        return config, run_pipeline(config)

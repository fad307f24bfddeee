"""A small corpus built by the real pipeline from a Parquet URL list with extra columns and a rotated photo.

Two images served over loopback HTTP: ``rotated.jpg``, a planted scene stored sideways with EXIF
orientation 6 (a viewer turns it upright), listed under a URL that redirects (so ``final_url`` differs
from ``url``), and ``plain.jpg``. The list carries the columns a DataComp/img2dataset user has: ``alt_text``,
a float ``score``, a ``tags`` list, a ``width`` that clashes with a corpus column, a timestamp, plus
licence and author. Built once per test session (the pipeline runs on CPU with the tiny captioner) and
shared by the corpus, loading and export tests.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ps3_engine.pipeline.config import RunConfig, load_run_config
from ps3_engine.pipeline.corpus import MANIFEST_KEY
from ps3_engine.pipeline.runner import run_pipeline
from ps3_engine.pipeline.samples import planted_scene, synthetic_scene

UPRIGHT_SIZE = (1200, 900)
EXIF_ORIENTATION = 0x0112

LIST_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string()),
        pa.field("alt_text", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("width", pa.int16()),
        pa.field("taken_at", pa.timestamp("s", tz="UTC")),
        pa.field("license", pa.string()),
        pa.field("author", pa.string()),
    ]
)


@dataclass(frozen=True)
class ProvenanceRun:
    config: RunConfig
    list_path: Path
    rows: dict[str, dict]  # input list row by file name
    upright: Image.Image  # rotated.jpg as a viewer shows it
    planted: list[tuple[int, int, int, int]]  # planted patches in the upright frame

    @property
    def root(self) -> Path:
        return Path(self.config.run_root)


def _rotated_jpeg(upright: Image.Image) -> bytes:
    """``upright`` stored sideways with orientation 6: exif_transpose (a viewer) turns it back upright."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


class _RedirectingHandler(SimpleHTTPRequestHandler):
    """Static files; ``/moved/<name>`` answers 302 to ``/<name>``."""

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/moved"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


@contextmanager
def serve_with_redirects(root: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RedirectingHandler, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_inputs(folder: Path, base_url: str) -> tuple[Path, dict[str, dict], Image.Image, list]:
    folder.mkdir(parents=True, exist_ok=True)
    upright, planted = planted_scene(*UPRIGHT_SIZE, seed=3, num_patches=1)
    (folder / "rotated.jpg").write_bytes(_rotated_jpeg(upright))
    synthetic_scene(900, 1200, seed=5).save(folder / "plain.jpg", "JPEG", quality=90)
    taken = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    rows = {
        "rotated.jpg": {
            "url": f"{base_url}/moved/rotated.jpg",
            "alt_text": "A sideways photo of a label",
            "score": 0.75,
            "tags": ["label", "rotated"],
            "width": 900,
            "taken_at": taken,
            "license": "CC-BY-4.0",
            "author": "A. Photographer",
        },
        "plain.jpg": {
            "url": f"{base_url}/plain.jpg",
            "alt_text": "Shapes on a gradient",
            "score": 0.5,
            "tags": [],
            "width": None,
            "taken_at": None,
            "license": "CC0-1.0",
            "author": None,
        },
    }
    path = folder / "list.parquet"
    pq.write_table(pa.Table.from_pylist(list(rows.values()), schema=LIST_SCHEMA), path)
    return path, rows, upright, planted


def run_config(list_path: Path, run_root: Path, captioner: Path, *overrides: str) -> RunConfig:
    return load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.min_short_side=800",
            "crawl.min_long_side=800",
            "crawl.http.allow_private_addresses=true",
            "segment.backend=classical",
            "segment.mask_max_side=512",
            "caption.backend=transformers",
            f"caption.model={captioner}",
            "caption.transformers.device=cpu",
            "caption.max_pixels=12544",
            "caption.sampling.max_new_tokens=48",
            "corpus.validation_fraction=0",
            *overrides,
        ],
        run_root=str(run_root),
        sources=[str(list_path)],
    )


_BUILT: dict[Path, ProvenanceRun] = {}


def build_provenance_run(base: Path, captioner: Path) -> ProvenanceRun:
    """The run under ``base``, built on first use; later calls in the session (other modules) reuse it."""
    if base not in _BUILT:
        with serve_with_redirects(base / "inputs") as base_url:
            list_path, rows, upright, planted = write_inputs(base / "inputs", base_url)
            config = run_config(list_path, base / "run", captioner)
            results = run_pipeline(config)
            assert all(r.failed_shards == [] for r in results), [r.failed_shards for r in results]
            assert (base / "run" / MANIFEST_KEY).exists()
        _BUILT[base] = ProvenanceRun(config, list_path, rows, upright, planted)
    return _BUILT[base]

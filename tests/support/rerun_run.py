"""A small finished run with both branches, for the rerun tests (status --check, retry, --force, plan).

Four zoo URLs in two crawl shards of two, one of which (``/error500.jpg``) fails with a transient HTTP 500
until the zoo is healed, and one two-page PDF rendered into one render shard; every stage ran, so the run
has crawl, segment, caption, render and corpus shards (images' and pages') and a packed dataset. Tests
copy it (:func:`copy_run`) before changing anything.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ps3_engine.pipeline.config import RunConfig, load_run_config
from tests.support.pdfs import text_pdf
from tests.support.zoo import ZOO_CRAWL_OVERRIDES

URL_PATHS = ("/good/0.jpg", "/error500.jpg", "/good/1.jpg", "/good/2.jpg")


@dataclass(frozen=True)
class RerunRun:
    root: Path
    urls: Path
    pdfs: Path
    captioner: Path

    def config(self, root: Path | None = None, *overrides: str, documents: bool = True) -> RunConfig:
        """The run's config (or the same for a copy at ``root``); ``documents=False``: no PDF sources."""
        crawl = [o for o in ZOO_CRAWL_OVERRIDES if not o.startswith("crawl.shard_size")]
        return load_run_config(
            None,
            [
                "executor.kind=local",
                "executor.progress=false",
                *crawl,
                "crawl.shard_size=2",
                "segment.mask_max_side=384",
                "caption.backend=transformers",
                f"caption.model={self.captioner}",
                "caption.transformers.device=cpu",
                "caption.max_pixels=12544",
                "caption.sampling.max_new_tokens=32",
                "render.text_source=text_layer",
                *overrides,
            ],
            run_root=str(root or self.root),
            sources=[str(self.urls)],
            document_sources=[str(self.pdfs)] if documents else None,
        )

    def copy_run(self, root: Path) -> Path:
        shutil.copytree(self.root, root)
        return root


def build_rerun_run(folder: Path, zoo, captioner: Path) -> RerunRun:
    from ps3_engine.pipeline.runner import run_pipeline

    urls = folder / "urls.txt"
    urls.write_text("".join(f"{zoo.url(p)}\n" for p in URL_PATHS))
    pdfs = folder / "pdfs"
    pdfs.mkdir()
    (pdfs / "doc.pdf").write_bytes(text_pdf(num_pages=2, seed=1).data)
    run = RerunRun(folder / "run", urls, pdfs, captioner)
    zoo.healed = False
    results = run_pipeline(run.config())
    assert [r.stage for r in results] == ["crawl", "segment", "caption", "render", "build-corpus"]
    assert all(not r.failed_shards for r in results)
    assert results[0].errors_by_reason == {"http_500": 1}
    return run

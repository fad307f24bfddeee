"""The HTML run report: renders in headless Chromium with its samples, crops, captions and plots."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.report import bar_chart_svg, build_report, histogram_svg
from ps3_engine.pipeline.runner import run_pipeline
from ps3_engine.pipeline.samples import write_scenes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def captioned_run(tmp_path_factory, tiny_captioner):
    folder = tmp_path_factory.mktemp("report-images")
    write_scenes(folder, 3, size=(1200, 900))
    run_root = tmp_path_factory.mktemp("report-run") / "run"
    config = load_run_config(
        None,
        [
            "executor.kind=local",
            "executor.progress=false",
            "crawl.min_short_side=512",
            "crawl.min_long_side=512",
            "caption.backend=transformers",
            f"caption.model={tiny_captioner}",
            "caption.transformers.device=cpu",
            "caption.max_pixels=12544",
            "caption.sampling.max_new_tokens=48",
        ],
        run_root=str(run_root),
        sources=[str(folder)],
    )
    results = run_pipeline(config, ("crawl", "segment", "caption"))
    assert all(not r.failed_shards for r in results)
    return run_root, results


def _rendered_dom(path) -> str:
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{path}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (scripts/test.sh installs it)")
def test_report_renders_in_headless_chromium(captioned_run, tmp_path):
    run_root, _ = captioned_run
    out = tmp_path / "report.html"
    assert main(["report", str(run_root), "--out", str(out), "--samples", "2"]) == 0
    dom = _rendered_dom(out)
    assert dom.count('class="sample"') == 2
    # One crop per selected box of the two sampled images (top_k = 4 boxes at most per image).
    assert 2 <= dom.count('class="crop"') <= 8
    # regions/image, box size, two caption lengths, errors by reason (this clean run has none: no chart)
    assert dom.count('class="plot"') == 5
    assert dom.count("<svg") == 4
    assert "Global caption:" in dom and "Regions per image" in dom
    assert 'id="stages"' in dom and "caption" in dom


def test_report_is_stored_in_the_run_root_and_lists_captions(captioned_run):
    run_root, _ = captioned_run
    assert main(["report", str(run_root), "--samples", "1"]) == 0
    page = (run_root / "report" / "index.html").read_text()
    assert page.count('class="sample"') == 1
    assert '"local_captions":' in page.replace("&quot;", '"')


def test_report_of_a_non_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run root"):
        build_report(str(tmp_path))


def test_plots_scale_to_their_data():
    svg = histogram_svg([1, 1, 1, 5], "h", "x", bins=4)
    assert svg.count('class="bar"') == 4 and "max 3" in svg and "(n=4)" in svg
    assert "no data" in histogram_svg([], "h", "x")
    bars = bar_chart_svg({"a": 4, "b": 2}, "errors")
    assert bars.index(">a<") < bars.index(">b<") and 'width="0' not in bars

"""The HTML run report: renders in headless Chromium with its samples, crops, captions, plots and failures."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from ps3_engine.pipeline.cli import main
from ps3_engine.pipeline.config import load_run_config
from ps3_engine.pipeline.report import bar_chart_svg, build_report, histogram_svg, stage_table
from ps3_engine.pipeline.runner import run_pipeline
from ps3_engine.pipeline.samples import synthetic_scene, write_scenes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def captioned_run(tmp_path_factory, tiny_captioner):
    folder = tmp_path_factory.mktemp("report-images")
    write_scenes(folder, 3, size=(1200, 900))
    synthetic_scene(200, 150, 7).save(folder / "too-small.jpg")  # one filtered item for the failures table
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
    # regions/image, box size, two caption lengths, failed/filtered items by reason
    assert dom.count('class="plot"') == 5
    assert dom.count("<svg") == 5
    assert "Global caption:" in dom and "Regions per image" in dom
    assert 'id="stages"' in dom and 'id="counts"' in dom and 'id="failures"' in dom


def test_report_is_stored_in_the_run_root_and_lists_captions(captioned_run):
    run_root, _ = captioned_run
    assert main(["report", str(run_root), "--samples", "1"]) == 0
    page = (run_root / "report" / "index.html").read_text()
    assert page.count('class="sample"') == 1
    assert re.search(r"<td>local captions</td><td>[1-9]\d*</td>", page)
    # Every sample says where its image came from and under which licence.
    assert "Source: <a href=" in page and "Licence: " in page


def test_failed_and_filtered_items_are_listed_with_their_errors_file(captioned_run):
    run_root, _ = captioned_run
    page = build_report(str(run_root), samples=0)
    failures = page[page.index('id="failures"') :]
    row = re.search(r"<td>crawl</td><td>filtered</td><td>(\w+)</td><td><code>([^<]*)</code>", failures)
    assert row and row.group(1) == "too_small" and row.group(2).endswith("too-small.jpg")
    link = re.search(r'<a href="\.\./(crawl/errors/part-[^"]+\.parquet)">', failures)
    assert link and (run_root / link.group(1)).is_file()  # the link resolves from report/index.html


def test_stages_are_in_pipeline_order():
    summary = {"stages": {name: {"kept_rows": 1} for name in ("segment", "build-corpus", "caption", "crawl")}}
    table = stage_table(summary)
    positions = [table.index(f"<td>{name}</td>") for name in ("crawl", "segment", "caption", "build-corpus")]
    assert positions == sorted(positions)


def test_report_of_a_non_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run root"):
        build_report(str(tmp_path))


def _texts(svg: str) -> list[str]:
    return [t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def test_plots_handle_constant_data():
    # All images with 4 regions: one bar at 4, a tick at 4, not an axis from 4 to 4.
    texts = _texts(histogram_svg([4, 4, 4], "Regions per image", "regions", integer=True))
    ticks = texts[: texts.index("regions")]
    assert ticks == ["4"]
    # All box fractions 0.2: distinct tick labels around 0.2.
    texts = _texts(histogram_svg([0.2, 0.2], "Box side", "fraction"))
    ticks = texts[: texts.index("fraction")]
    assert len(ticks) == len(set(ticks)) >= 3 and "0.20" in ticks
    assert "no data" in histogram_svg([], "h", "x")
    assert "(n=4)" in histogram_svg([1, 1, 1, 5], "h", "x", integer=True)
    bars = _texts(bar_chart_svg({"crawl: http_404": 4, "caption: empty": 2}, "errors"))
    assert {"crawl: http_404", "caption: empty", "4", "2"} <= set(bars)

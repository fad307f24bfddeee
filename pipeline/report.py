"""``ps3-engine report RUN``: one self-contained HTML page to eyeball a run.

What a reader sees, top to bottom: the stages in pipeline order (crawl, render, segment, caption,
build-corpus) as a table of shards, items kept, filtered and failed, wall time and rate; the corpus
counts as a table; distributions drawn with matplotlib (regions per image, box sizes, caption
lengths, errors by reason); failed and filtered items, the first few per reason, each with a link to
its errors Parquet; and sample images with their boxes drawn and numbered, each crop beside its
caption, the global caption, and the image's URL and licence. Everything is embedded (base64 JPEG
thumbnails, inline SVG), so the page can be copied anywhere. Read-only: it never changes the run.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.corpus import MANIFEST_KEY as DATASET_MANIFEST_KEY
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.stages.imaging import load_rgb

logger = logging.getLogger(__name__)

REPORT_KEY = "report/index.html"
# Pipeline order; the summary's stage names (build-corpus) and the folders' (corpus) differ.
SUMMARY_STAGES = ("crawl", "render", "segment", "caption", "build-corpus")
STAGE_FOLDERS = {name: "corpus" if name == "build-corpus" else name for name in SUMMARY_STAGES}  # name -> shards
ERROR_STAGES = ("crawl", "render", "segment", "caption", "corpus", "document-corpus")
BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
BAR_COLOUR = "#4363d8"
MAX_MESSAGE_CHARS = 200


def _jpeg_data_uri(image: Image.Image, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_html(figure: Figure, title: str) -> str:
    """Inline SVG with real <text> (searchable, small) wrapped in a captioned <figure>."""
    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none", "font.size": 9}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and doctype: the SVG sits inside HTML
    return f'<figure class="plot">{svg}<figcaption>{html.escape(title)}</figcaption></figure>'


def _no_data(title: str) -> str:
    return f'<figure class="plot empty"><figcaption>{html.escape(title)}: no data</figcaption></figure>'


def histogram_svg(values: Sequence[float], title: str, x_label: str, integer: bool = False, bins: int = 12) -> str:
    """A histogram as inline SVG. Integer data gets one bar per value; constant data one centred bar."""
    if not values:
        return _no_data(title)
    data = np.asarray(values, dtype=float)
    low, high = float(data.min()), float(data.max())
    if integer:
        edges: Any = np.arange(np.floor(low) - 0.5, np.ceil(high) + 1.5)
    elif low == high:
        # One value: a unit-wide (or value-wide) window around it, so the axis has a real range.
        half = abs(low) * 0.1 or 0.5
        edges = np.linspace(low - half, high + half, 4)
    else:
        edges = bins
    figure = Figure(figsize=(4.0, 2.6))
    axes = figure.subplots()
    axes.hist(data, bins=edges, color=BAR_COLOUR, edgecolor="white")
    axes.set_xlabel(x_label)
    axes.set_ylabel("count")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    if integer and high - low <= 15:
        axes.set_xticks(np.arange(np.floor(low), np.ceil(high) + 1))  # every value a tick, even a lone one
        axes.set_xlim(np.floor(low) - 1, np.ceil(high) + 1)  # a lone value is a bar, not a wall
    elif integer:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.spines[["top", "right"]].set_visible(False)
    return _figure_html(figure, f"{title} (n={len(data)})")


def bar_chart_svg(counts: dict[str, int], title: str) -> str:
    """Horizontal bars, one per label, largest on top."""
    if not counts:
        return _no_data(title)
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    figure = Figure(figsize=(5.5, 0.6 + 0.28 * len(items)))
    axes = figure.subplots()
    labels = [label for label, _ in items][::-1]
    values = [count for _, count in items][::-1]
    bars = axes.barh(labels, values, color=BAR_COLOUR)
    axes.bar_label(bars, padding=3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.spines[["top", "right"]].set_visible(False)
    return _figure_html(figure, title)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def stage_table(summary: dict[str, Any], committed: dict[str, int] | None = None) -> str:
    """Per-stage counts from summary.json, in pipeline order.

    A stage with ``committed`` shards but no summary entry (a lost summary, or one written before the
    stage was summarised) still gets a row, with its shard count only: before, it was left out.
    """
    stages = summary.get("stages", {})
    rows = []
    for name in (*SUMMARY_STAGES, *sorted(set(stages) - set(SUMMARY_STAGES))):
        s = stages.get(name)
        if s is None:
            if (committed or {}).get(name):
                rows.append([html.escape(name), f"{committed[name]} committed (not in summary.json)", *["-"] * 6])
            continue
        rows.append(
            [
                html.escape(name),
                f"{s.get('computed_shards', 0)} computed, {s.get('skipped_shards', 0)} done before, "
                f"{len(s.get('failed_shards', []))} failed (of {s.get('planned_shards', 0)})",
                s.get("input_rows", 0),
                s.get("kept_rows", 0),
                sum(s.get("filtered_by_reason", {}).values()),
                sum(s.get("errors_by_reason", {}).values()),
                f"{s.get('wall_s', 0.0):.1f}",
                f"{s.get('throughput_rows_per_s', 0.0):.1f}",
            ]
        )
    headers = ["stage", "shards", "items in", "kept", "filtered", "failed", "wall s", "items/s"]
    return _table(headers, rows, "stages") if rows else "<p>No stage has run yet.</p>"


def counts_table(counts: dict[str, int], dataset: dict[str, Any] | None) -> str:
    rows = [[html.escape(name.replace("_", " ")), value] for name, value in counts.items()]
    for split, split_counts in sorted((dataset or {}).get("counts", {}).items()):
        for name, value in split_counts.items():
            rows.append([html.escape(f"dataset {split}: {name.replace('_', ' ')}"), value])
    return _table(["count", "value"], rows, "counts")


def _relative_link(key: str) -> str:
    """A link from report/index.html to another object of the same run root."""
    return f"../{key}"


def failures_table(layout: RunLayout, per_reason: int) -> tuple[str, dict[str, int]]:
    """Failed and filtered items: the first ``per_reason`` per (stage, category, reason), each with a link
    to the errors Parquet that holds it; plus the counts by ``stage: reason`` for the bar chart."""
    shown: dict[tuple[str, str, str], list[str]] = {}
    totals: Counter[tuple[str, str, str]] = Counter()
    for stage in ERROR_STAGES:
        sources = [(layout.errors_key(stage, shard), shard) for shard in sorted(layout.manifests(stage))]
        if stage == "crawl" and layout.storage.exists(layout.DEDUP_KEY):
            sources.append((layout.DEDUP_KEY, None))
        for key, shard in sources:
            table = layout.read_shard_errors(stage, shard) if shard else layout.storage.read_parquet(key)
            for row in table.select(["item_id", "input_ref", "category", "reason", "message"]).to_pylist():
                group = (stage, row["category"], row["reason"])
                totals[group] += 1
                if len(shown.setdefault(group, [])) < per_reason:
                    message = html.escape(row["message"][:MAX_MESSAGE_CHARS])
                    shown[group].append(
                        f"<tr><td>{html.escape(stage)}</td><td>{html.escape(row['category'])}</td>"
                        f"<td>{html.escape(row['reason'])}</td><td><code>{html.escape(row['input_ref'])}</code></td>"
                        f'<td>{message}</td><td><a href="{html.escape(_relative_link(key))}">'
                        f"{html.escape(key)}</a></td></tr>"
                    )
    by_reason = {f"{stage}: {reason}": count for (stage, _, reason), count in totals.items()}
    if not totals:
        return "<p>No failed or filtered items.</p>", by_reason
    rows = []
    for group in sorted(shown, key=lambda g: (ERROR_STAGES.index(g[0]), g[1], -totals[g], g[2])):
        more = totals[group] - len(shown[group])
        rows.extend(shown[group])
        if more:
            rows.append(f'<tr class="more"><td colspan="6">... and {more} more {html.escape(group[2])}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("stage", "kind", "reason", "input", "message", "errors file"))
    return f'<table id="failures"><tr>{head}</tr>{"".join(rows)}</table>', by_reason


def _crawl_rows(layout: RunLayout, image_ids: set[str]) -> dict[str, dict[str, Any]]:
    columns = ["image_id", "image_bytes", "image_ref", "source_ref", "final_url", "license", "attribution"]
    found: dict[str, dict[str, Any]] = {}
    for entry in layout.manifests("crawl").values():
        for row in layout.storage.read_parquet(entry.output_key, columns=columns).to_pylist():
            if row["image_id"] in image_ids:
                found[row["image_id"]] = row
        if len(found) == len(image_ids):
            break
    return found


def _image_bytes(row: dict[str, Any], s3: S3Settings | None) -> bytes | None:
    if row["image_bytes"] is not None:
        return row["image_bytes"]
    ref = row.get("image_ref") or ""
    if ref.startswith(("http://", "https://")):
        return None
    from ps3_engine.infra.storage import read_uri_bytes

    return read_uri_bytes(ref, s3)


def _provenance_html(row: dict[str, Any]) -> str:
    url = row.get("final_url") or row.get("source_ref") or ""
    link = f'<a href="{html.escape(url)}">{html.escape(url)}</a>' if url else "<em>unknown</em>"
    listed = row.get("source_ref")
    if listed and listed != url:
        link += f" (listed as <code>{html.escape(listed)}</code>)"
    licence = html.escape(row.get("license") or "not given")
    attribution = f"; attribution: {html.escape(row['attribution'])}" if row.get("attribution") else ""
    return f'<p class="provenance">Source: {link}<br>Licence: {licence}{attribution}</p>'


def _sample_section(image: Image.Image, regions: list[dict[str, Any]], global_caption: str | None, row: dict) -> str:
    thumb = image.copy()
    thumb.thumbnail((900, 900))
    scale = thumb.width / image.width
    draw = ImageDraw.Draw(thumb)
    crops = []
    for i, region in enumerate(regions):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        box = [region["x0"] * scale, region["y0"] * scale, region["x1"] * scale, region["y1"] * scale]
        draw.rectangle(box, outline=colour, width=3)
        draw.text((box[0] + 4, box[1] + 2), str(i + 1), fill=colour)
        crop = image.crop((region["x0"], region["y0"], region["x1"], region["y1"]))
        crop.thumbnail((220, 220))
        caption = region.get("caption")
        caption_html = html.escape(caption) if caption else '<em class="missing">no usable caption</em>'
        crops.append(
            f'<div class="crop"><img src="{_jpeg_data_uri(crop)}" alt="region {i + 1}">'
            f'<p><b style="color:{colour}">{i + 1}</b> ({region["x0"]}, {region["y0"]}, {region["x1"]}, '
            f"{region['y1']})<br>{caption_html}</p></div>"
        )
    global_html = html.escape(global_caption) if global_caption else "<em>none</em>"
    title = html.escape(row["image_id"][:16])
    return (
        f'<section class="sample"><h3>{title}</h3>{_provenance_html(row)}'
        f'<img class="overview" src="{_jpeg_data_uri(thumb)}" alt="{title} with boxes">'
        f'<p class="global"><b>Global caption:</b> {global_html}</p>'
        f'<div class="crops">{"".join(crops)}</div></section>'
    )


def _read_outputs(layout: RunLayout) -> tuple[dict[str, list[dict]], dict[str, tuple[int, int]], dict, dict]:
    """Regions by image, image sizes, local captions by region and global captions by image."""
    regions_by_image: dict[str, list[dict[str, Any]]] = {}
    for entry in layout.manifests("segment").values():
        for row in layout.storage.read_parquet(entry.output_key).to_pylist():
            regions_by_image.setdefault(row["image_id"], []).append(row)
    dims: dict[str, tuple[int, int]] = {}
    for entry in layout.manifests("crawl").values():
        table = layout.storage.read_parquet(entry.output_key, columns=["image_id", "width", "height"])
        for row in table.to_pylist():
            dims[row["image_id"]] = (row["width"], row["height"])
    local: dict[str, str] = {}
    global_: dict[str, str] = {}
    for entry in layout.manifests("caption").values():
        table = layout.storage.read_parquet(entry.output_key, columns=["image_id", "region_id", "kind", "clean_text"])
        for row in table.to_pylist():
            if row["kind"] == "global":
                global_[row["image_id"]] = row["clean_text"]
            else:
                local[row["region_id"]] = row["clean_text"]
    return regions_by_image, dims, local, global_


def build_report(
    run_root: str, s3: S3Settings | None = None, samples: int = 6, seed: int = 0, errors_per_reason: int = 5
) -> str:
    """Render the report HTML for a run root (local or S3).

    Raises:
        FileNotFoundError: ``run_root`` holds no run.json.
    """
    layout = RunLayout(Storage(run_root, s3))
    if not layout.storage.exists(layout.RUN_CONFIG_KEY):
        raise FileNotFoundError(f"{run_root} is not a run root (no {layout.RUN_CONFIG_KEY})")
    storage = layout.storage
    summary = storage.read_json(layout.SUMMARY_KEY) if storage.exists(layout.SUMMARY_KEY) else {}
    dataset = storage.read_json(DATASET_MANIFEST_KEY) if storage.exists(DATASET_MANIFEST_KEY) else None
    regions_by_image, dims, local, global_ = _read_outputs(layout)

    box_fractions = []
    for image_id, regions in regions_by_image.items():
        width, height = dims.get(image_id, (0, 0))
        for region in regions:
            region["caption"] = local.get(region["region_id"])
            if width and height:
                side = ((region["x1"] - region["x0"]) * (region["y1"] - region["y0"])) ** 0.5
                box_fractions.append(side / min(width, height))
    failures, errors_by_reason = failures_table(layout, errors_per_reason)

    chosen = sorted(regions_by_image)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:samples]
    rows = _crawl_rows(layout, set(chosen))
    sections = []
    for image_id in chosen:
        data = _image_bytes(rows[image_id], s3) if image_id in rows else None
        if data is None:
            continue
        regions = sorted(regions_by_image[image_id], key=lambda r: r["rank"])
        sections.append(_sample_section(load_rgb(data), regions, global_.get(image_id), rows[image_id]))

    counts = {
        "images with regions": len(regions_by_image),
        "regions": sum(len(r) for r in regions_by_image.values()),
        "local captions": len(local),
        "global captions": len(global_),
    }
    plots = [
        histogram_svg([len(r) for r in regions_by_image.values()], "Regions per image", "regions", integer=True),
        histogram_svg(box_fractions, "Box side / image short side", "fraction"),
        histogram_svg([len(t.split()) for t in local.values()], "Local caption length", "words", integer=True),
        histogram_svg([len(t.split()) for t in global_.values()], "Global caption length", "words", integer=True),
        bar_chart_svg(errors_by_reason, "Failed and filtered items by stage and reason"),
    ]
    return PAGE.format(
        title=html.escape(f"PS3 data engine run: {run_root}"),
        run_root=html.escape(run_root),
        stages=stage_table(summary, {name: len(layout.manifests(folder)) for name, folder in STAGE_FOLDERS.items()}),
        counts=counts_table(counts, dataset),
        plots="".join(plots),
        failures=failures,
        samples="".join(sections) or "<p>No segmented images to show yet.</p>",
    )


def write_report(run_root: str, s3: S3Settings | None = None, samples: int = 6, errors_per_reason: int = 5) -> str:
    """Render and store the report at ``<run>/report/index.html``; returns its URI."""
    page = build_report(run_root, s3, samples, errors_per_reason=errors_per_reason)
    storage = Storage(run_root, s3)
    storage.write_bytes_atomic(REPORT_KEY, page.encode())
    return storage.uri(REPORT_KEY)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1rem; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }}
td {{ vertical-align: top; }} tr.more td {{ color: #666; font-style: italic; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }}
.sample {{ border-top: 1px solid #ddd; margin-top: 2rem; }} .overview {{ max-width: 900px; }}
.crops {{ display: flex; flex-wrap: wrap; gap: 1rem; }} .crop {{ width: 240px; }} .missing {{ color: #b00; }}
</style></head><body>
<h1>PS3 data engine run</h1><p>Run root: <code>{run_root}</code></p>
<h2>Stages</h2>{stages}
<h2>Counts</h2>{counts}
<h2>Distributions</h2><div class="plots">{plots}</div>
<h2>Failed and filtered items</h2>{failures}
<h2>Samples</h2>{samples}
</body></html>
"""

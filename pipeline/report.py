"""``ps3-engine report RUN``: one self-contained HTML page to eyeball a run.

Sample images with their selected boxes drawn and numbered, each crop next to its caption, the global
caption, per-stage counts, and inline SVG plots (regions per image, box sizes, caption lengths, errors
by reason). Everything is embedded (base64 JPEG thumbnails, inline SVG), so the page can be copied
anywhere or opened straight from S3. Read-only: it never changes the run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.pipeline.layout import RunLayout
from ps3_engine.stages.imaging import load_rgb

logger = logging.getLogger(__name__)

REPORT_KEY = "report/index.html"
BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def _jpeg_data_uri(image: Image.Image, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def histogram_svg(values: Sequence[float], title: str, x_label: str, bins: int = 12) -> str:
    """A small inline SVG histogram (no plotting library needed)."""
    width, height, pad = 360, 200, 30
    if not values:
        return f'<figure class="plot"><figcaption>{html.escape(title)}: no data</figcaption></figure>'
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, int((value - low) / span * bins))] += 1
    top = max(counts)
    bar_w = (width - 2 * pad) / bins
    bars = []
    for i, count in enumerate(counts):
        bar_h = (height - 2 * pad) * count / top
        x = pad + i * bar_w
        y = height - pad - bar_h
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{bar_h:.1f}">'
            f"<title>{low + i * span / bins:.3g}-{low + (i + 1) * span / bins:.3g}: {count}</title></rect>"
        )
    return (
        f'<figure class="plot"><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        + "".join(bars)
        + f'<text x="{pad}" y="{height - 8}">{low:.3g}</text>'
        + f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{high:.3g}</text>'
        + f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
        + f'<text x="{pad}" y="16">max {top}</text>'
        + f"</svg><figcaption>{html.escape(title)} (n={len(values)})</figcaption></figure>"
    )


def bar_chart_svg(counts: dict[str, int], title: str) -> str:
    """Horizontal bars, one per label, largest first."""
    if not counts:
        return f'<figure class="plot"><figcaption>{html.escape(title)}: none</figcaption></figure>'
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    row_h, label_w, width = 22, 230, 520
    top = max(counts.values())
    rows = []
    for i, (label, count) in enumerate(items):
        y = 8 + i * row_h
        bar_w = (width - label_w - 50) * count / top
        rows.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y}" width="{bar_w:.1f}" height="{row_h - 6}"></rect>'
            f'<text x="{label_w + bar_w + 4:.1f}" y="{y + 14}">{count}</text>'
        )
    height = 16 + row_h * len(items)
    return (
        f'<figure class="plot"><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        + "".join(rows)
        + f"</svg><figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _load_images(layout: RunLayout, image_ids: set[str], s3: S3Settings | None) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in layout.manifests("crawl").values():
        table = layout.storage.read_parquet(entry.output_key, columns=["image_id", "image_bytes", "image_ref"])
        for row in table.to_pylist():
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


def _sample_section(image: Image.Image, regions: list[dict[str, Any]], global_caption: str | None, title: str) -> str:
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
    return (
        f'<section class="sample"><h3>{html.escape(title)}</h3>'
        f'<img class="overview" src="{_jpeg_data_uri(thumb)}" alt="{html.escape(title)} with boxes">'
        f'<p class="global"><b>Global caption:</b> {global_html}</p>'
        f'<div class="crops">{"".join(crops)}</div></section>'
    )


def build_report(run_root: str, s3: S3Settings | None = None, samples: int = 6, seed: int = 0) -> str:
    """Render the report HTML for a run root (local or S3)."""
    layout = RunLayout(Storage(run_root, s3))
    if not layout.storage.exists(layout.RUN_CONFIG_KEY):
        raise FileNotFoundError(f"{run_root} is not a run root (no {layout.RUN_CONFIG_KEY})")
    summary = layout.storage.read_json(layout.SUMMARY_KEY) if layout.storage.exists(layout.SUMMARY_KEY) else {}

    regions_by_image: dict[str, list[dict[str, Any]]] = {}
    dims: dict[str, tuple[int, int]] = {}
    for entry in layout.manifests("segment").values():
        for row in layout.storage.read_parquet(entry.output_key).to_pylist():
            regions_by_image.setdefault(row["image_id"], []).append(row)
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

    box_fractions = []
    for image_id, regions in regions_by_image.items():
        width, height = dims.get(image_id, (0, 0))
        for region in regions:
            region["caption"] = local.get(region["region_id"])
            if width and height:
                side = ((region["x1"] - region["x0"]) * (region["y1"] - region["y0"])) ** 0.5
                box_fractions.append(side / min(width, height))
    errors: dict[str, int] = {}
    for stage in ("crawl", "segment", "caption", "corpus"):
        for reason, count in Counter(layout.read_errors(stage).column("reason").to_pylist()).items():
            errors[f"{stage}: {reason}"] = count

    chosen = sorted(regions_by_image)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:samples]
    rows = _load_images(layout, set(chosen), s3)
    sections = []
    for image_id in chosen:
        data = _image_bytes(rows[image_id], s3) if image_id in rows else None
        if data is None:
            continue
        regions = sorted(regions_by_image[image_id], key=lambda r: r["rank"])
        sections.append(_sample_section(load_rgb(data), regions, global_.get(image_id), image_id[:16]))

    stage_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s.get('kept_rows', '')}</td><td>{s.get('error_rows', '')}</td>"
        f"<td>{s.get('wall_s', 0):.1f}</td><td>{s.get('throughput_rows_per_s', '')}</td></tr>"
        for name, s in summary.get("stages", {}).items()
    )
    plots = [
        histogram_svg([len(r) for r in regions_by_image.values()], "Regions per image", "regions"),
        histogram_svg(box_fractions, "Box side / image short side", "fraction"),
        histogram_svg([len(t.split()) for t in local.values()], "Local caption length", "words"),
        histogram_svg([len(t.split()) for t in global_.values()], "Global caption length", "words"),
        bar_chart_svg(errors, "Errors and filtered items by stage and reason"),
    ]
    return PAGE.format(
        title=html.escape(f"PS3 data engine run: {run_root}"),
        run_root=html.escape(run_root),
        stage_rows=stage_rows,
        counts=html.escape(
            json.dumps(
                {
                    "images_with_regions": len(regions_by_image),
                    "local_captions": len(local),
                    "global_captions": len(global_),
                }
            )
        ),
        plots="".join(plots),
        samples="".join(sections) or "<p>No segmented images to show yet.</p>",
    )


def write_report(run_root: str, s3: S3Settings | None = None, samples: int = 6) -> str:
    """Render and store the report at ``<run>/report/index.html``; returns its URI."""
    page = build_report(run_root, s3, samples)
    storage = Storage(run_root, s3)
    storage.write_bytes_atomic(REPORT_KEY, page.encode())
    return storage.uri(REPORT_KEY)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1rem; }} .plot svg {{ background: #fafafa; }}
.bar {{ fill: #4363d8; }} text {{ font-size: 11px; }}
.sample {{ border-top: 1px solid #ddd; margin-top: 2rem; }} .overview {{ max-width: 900px; }}
.crops {{ display: flex; flex-wrap: wrap; gap: 1rem; }} .crop {{ width: 240px; }} .missing {{ color: #b00; }}
</style></head><body>
<h1>PS3 data engine run</h1><p>Run root: <code>{run_root}</code></p>
<h2>Stages</h2>
<table id="stages"><tr><th>stage</th><th>kept</th><th>errors</th><th>wall s</th><th>items/s</th></tr>
{stage_rows}</table>
<p id="counts">{counts}</p>
<h2>Distributions</h2><div class="plots">{plots}</div>
<h2>Samples</h2>{samples}
</body></html>
"""

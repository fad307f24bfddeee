"""Segment-stage benchmark: seconds per 4K image per backend on CPU, and recall of planted detail.

Run:  .venv/bin/python benchmarks/segment.py --images 12 --write-docs

Scenes are 3840x2160 JPEGs with three small detailed patches (tiny text and dots, ~270 px) planted on a
smooth background with large flat distractor shapes (``pipeline.samples.planted_scene``). A planted patch
counts as found when a selected box has IoU >= 0.3 with it (the issue's criterion); the centre-hit rate
(patch centre inside a selected box) is reported too, because the paper's grid of 1/5-short-side squares
cannot reach IoU 0.3 with a ~1/8-short-side patch that straddles two grid cells.
SAM2 runs with random weights here (no weights can be downloaded on this machine), so only its time
is meaningful; its recall needs real weights on a GPU.
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine_description, replace_doc_section
from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.stages.geometry import BoxXYXY, iou
from ps3_engine.stages.imaging import load_rgb
from ps3_engine.stages.segment import SegmentConfig, select_regions
from ps3_engine.stages.segmenters.classical import ClassicalSegmenter, ClassicalSettings
from ps3_engine.stages.segmenters.sam2 import Sam2Segmenter, Sam2Settings

logger = logging.getLogger("benchmarks.segment")
SIZE = (3840, 2160)


def make_scenes(count: int) -> list[tuple[bytes, list[tuple]]]:
    scenes = []
    for seed in range(count):
        image, planted = planted_scene(*SIZE, seed=1000 + seed, num_patches=3)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        scenes.append((buffer.getvalue(), planted))
    return scenes


def run_backend(segmenter, scenes, configs: dict[str, SegmentConfig], mask_max_side: int) -> dict:
    seconds, hits, centre_hits = [], dict.fromkeys(configs, 0), dict.fromkeys(configs, 0)
    total = 0
    for data, planted in scenes:
        began = time.perf_counter()
        work = np.asarray(load_rgb(data, max_side=mask_max_side))
        masks = segmenter.masks(work, *SIZE)
        selections = {name: select_regions(masks, *SIZE, config) for name, config in configs.items()}
        seconds.append(time.perf_counter() - began)
        for patch in planted:
            total += 1
            cx, cy = (patch[0] + patch[2]) / 2, (patch[1] + patch[3]) / 2
            for name, selected in selections.items():
                hits[name] += any(iou(BoxXYXY(*patch), box) >= 0.3 for box, _ in selected)
                centre_hits[name] += any(b.x0 <= cx < b.x1 and b.y0 <= cy < b.y1 for b, _ in selected)
    return {
        "mean_s": statistics.mean(seconds),
        "median_s": statistics.median(seconds),
        "recall": {name: hits[name] / total for name in configs},
        "centre_hit": {name: centre_hits[name] / total for name in configs},
        "patches": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--sam2-images", type=int, default=2)
    parser.add_argument("--sam2-points", type=int, default=8, help="points_per_side for the SAM2 timing")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    logger.info("generating %d planted 4K scenes", args.images)
    scenes = make_scenes(args.images)
    configs = {
        "paper grid (stride = side)": SegmentConfig(),
        "half-stride grid": SegmentConfig(grid_stride_fraction=0.5),
    }
    classical = ClassicalSegmenter(ClassicalSettings())
    classical.setup()
    logger.info("classical backend")
    classical_result = run_backend(classical, scenes, configs, 1024)

    sam2_settings = Sam2Settings(
        model_cfg="configs/sam2.1/sam2.1_hiera_l.yaml",
        allow_random_weights=True,
        device="cpu",
        points_per_side=args.sam2_points,
        crop_n_layers=0,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    sam2 = Sam2Segmenter(sam2_settings)
    sam2.setup()
    logger.info("SAM2 hiera-L (random weights) at points_per_side=%d, crop_n_layers=0", args.sam2_points)
    sam2_result = run_backend(sam2, scenes[: args.sam2_images], configs, 1024)

    lines = [
        "| backend | settings | images | s / 4K image (mean) | median | recall IoU>=0.3 (paper grid) | "
        "recall (half-stride) | centre hit (paper grid) |",
        "|---|---|---|---|---|---|---|---|",
        f"| classical (Felzenszwalb) | scale 300, sigma 0.8, min_size 20, working copy 1024 px | {args.images} | "
        f"{classical_result['mean_s']:.2f} | {classical_result['median_s']:.2f} | "
        f"{classical_result['recall']['paper grid (stride = side)']:.2f} | "
        f"{classical_result['recall']['half-stride grid']:.2f} | "
        f"{classical_result['centre_hit']['paper grid (stride = side)']:.2f} |",
        f"| SAM2 hiera-L, random weights | points_per_side {args.sam2_points}, crop_n_layers 0, CPU | "
        f"{args.sam2_images} | {sam2_result['mean_s']:.1f} | {sam2_result['median_s']:.1f} | n/a | n/a | n/a |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        body = "\n".join(
            [
                f"Command: `.venv/bin/python benchmarks/segment.py --images {args.images} --sam2-images "
                f"{args.sam2_images} --sam2-points {args.sam2_points} --write-docs`",
                "",
                machine_description(),
                "",
                table,
                "",
                f"Scenes: {args.images} JPEGs of {SIZE[0]}x{SIZE[1]} with 3 planted ~270 px detail patches each "
                f"({classical_result['patches']} patches). Times include the JPEG decode of the 1024 px working copy, "
                "mask proposal, candidate scoring and selection, one process, one image at a time.",
                "",
                "Reading: the classical backend costs about a second per 4K image on one core. With the paper's grid "
                "(touching squares of 1/5 of the short side) most planted patches fall inside a selected box (centre "
                "hit), but a patch that straddles two grid cells often stays below IoU 0.3 with any single box; the "
                "`segment.grid_stride_fraction=0.5` option (overlapping candidates, selected boxes still disjoint) "
                "recovers most of them. SAM2 on CPU is far slower, and grows about linearly with the number of point "
                "prompts: the paper's settings (24x24 points plus one crop layer, about 5x as many prompts again) are "
                "for GPUs. Python " + platform.python_version() + ".",
            ]
        )
        replace_doc_section(Path("docs/benchmarks.md"), "Segment stage (benchmarks/segment.py)", body)


if __name__ == "__main__":
    main()

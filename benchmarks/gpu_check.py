"""GPU check: PS3 vs plain ViT training steps, SAM2 AMG on a 4K image, a 7B captioner's decoding, with random weights.

One command for the first machine with a GPU (about 5 minutes on one H200; needs only CUDA torch and
transformers, plus sam2 for its section; no Ray, no vLLM)::

    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --tiny            # the same code on CPU in seconds (the test suite)

Wheels to carry to a bare machine: this repository (``pip install --no-deps -e .``), pydantic, and for
the SAM2 section sam2 + hydra-core + iopath (``SAM2_BUILD_CUDA=0 pip install --no-deps sam2``).

Sections (each prints one line and lands in the JSON; a failing section is reported, the rest still run):

* ``ps3``: PS3-1.5K and PS3-4K (SigLIP-SO400M shapes) forward + backward of the pre-training loss, bf16
  autocast and gradient checkpointing, one 2560-patch round: s/step, samples/s, peak memory.
* ``vit``: the plain SO400M ViT on all patches at 1512 and 3780 (same precision and checkpointing), for the
  ratio. Paper Table 6: ViT 0.286 s at 1512 vs PS3 0.167 s at 50%; at 3780, 1.812 s vs PS3 0.417 s at 20%.
* ``sam2``: hiera-L automatic mask generation at the segment stage's settings (24 points per side, one
  crop layer) on one 3840x2160 image: s/image. Published on an H100: 0.86 s eager, 0.44 s compiled.
* ``captioner``: a Qwen2-VL-7B-shaped model generating for the captioning prompt's two images (the whole
  image and a region crop): tokens/s.
* ``vllm``: a hook; ``benchmarks/gpu_check_vllm.py`` (another engineer's) runs when vllm is importable.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ps3_engine.training.ps3.config import SO400M_VISION, PS3ModelConfig
from ps3_engine.training.ps3.losses import ps3_loss
from ps3_engine.training.ps3.model import PS3CLIP

logger = logging.getLogger("gpu_check")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timed(step: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Seconds per call (mean of ``repeats`` after ``warmup``) and peak memory in GiB (CUDA only)."""
    device = _device()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "peak_gib": peak}


# ---- PS3 vs plain ViT -------------------------------------------------------------------------------
def _ps3_config(name: str, tiny: bool) -> PS3ModelConfig:
    if not tiny:
        return PS3ModelConfig.paper_1p5k() if name == "1.5k" else PS3ModelConfig.paper_4k()
    base = PS3ModelConfig.tiny().model_dump()
    return PS3ModelConfig(**{**base, "scales": [56, 112, 224] if name == "1.5k" else [56, 112, 224, 280]})


def ps3_step(name: str, batch: int, tiny: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """One pre-training forward + backward (loss as in training) on random images, boxes and captions."""
    device = _device()
    cfg = _ps3_config(name, tiny)
    with device:  # parameters made on the GPU: a CPU init of SO400M towers would take most of the budget
        model = PS3CLIP.from_config(cfg).train()
    model.set_grad_checkpointing(True)
    size, context = max(cfg.scales), model.text.config.max_position_embeddings
    images = torch.randn(batch, 3, size, size, device=device)
    input_ids = torch.randint(3, model.text.config.vocab_size, (batch, context), device=device)
    gt_maps = torch.zeros(batch, size, size, device=device)
    gt_maps[:, size // 4 : size // 2, size // 3 : size // 2] = 1
    is_global = torch.arange(batch, device=device) % 4 == 0
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images=images, input_ids=input_ids, gt_maps=gt_maps, is_global=is_global)
        ps3_loss(out)["total"].backward()
        model.zero_grad(set_to_none=True)

    timing = _timed(step, warmup, repeats)
    tokens = cfg.grid_sizes[0] ** 2 + cfg.max_select
    return {
        "model": f"PS3-{name}",
        "batch": batch,
        "tokens_per_image": tokens,
        **timing,
        "samples_per_s": batch / timing["seconds"],
    }


def vit_step(size: int, batch: int, tiny: bool, warmup: int, repeats: int) -> dict[str, Any]:
    """The plain ViT (SO400M shape) on every patch at ``size``: forward + backward of its pooled output."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    device = _device()
    vision = PS3ModelConfig.tiny().vision if tiny else SO400M_VISION
    config = SiglipVisionConfig(**(vision or {}), attn_implementation="sdpa")
    with device:
        model = SiglipVisionModel(config).train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    images = torch.randn(batch, 3, size, size, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pooled = model(pixel_values=images, interpolate_pos_encoding=True).pooler_output
        pooled.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    timing = _timed(step, warmup, repeats)
    tokens = (size // config.patch_size) ** 2
    return {
        "model": f"ViT-{size}",
        "batch": batch,
        "tokens_per_image": tokens,
        **timing,
        "samples_per_s": batch / timing["seconds"],
    }


# ---- SAM2 -----------------------------------------------------------------------------------------
def sam2_amg(tiny: bool, repeats: int) -> dict[str, Any]:
    """Hiera-L AMG at the segment stage's settings on one random 3840x2160 image (random weights)."""
    try:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2
    except ImportError:
        return {"skipped": "sam2 is not importable"}
    import numpy as np

    from ps3_engine.stages.segmenters.sam2 import Sam2Settings

    settings = Sam2Settings(allow_random_weights=True)
    overrides = ["++model.image_size=256"] if tiny else []
    torch.manual_seed(0)
    model = build_sam2(
        settings.model_cfg, ckpt_path=None, device=str(_device()), mode="eval", hydra_overrides_extra=overrides
    )
    generator = SAM2AutomaticMaskGenerator(
        model,
        points_per_side=2 if tiny else settings.points_per_side,
        points_per_batch=settings.points_per_batch,
        crop_n_layers=0 if tiny else settings.crop_n_layers,
        pred_iou_thresh=settings.pred_iou_thresh,
        stability_score_thresh=settings.stability_score_thresh,
    )
    if tiny:
        generator.predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]
    height, width = (216, 384) if tiny else (2160, 3840)
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    timing = _timed(lambda: generator.generate(image), 1 if not tiny else 0, repeats)
    return {
        "model": "sam2.1-hiera-l",
        "image": f"{width}x{height}",
        "s_per_image": timing["seconds"],
        "peak_gib": timing["peak_gib"],
    }


# ---- captioner ------------------------------------------------------------------------------------
QWEN2_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
}
QWEN2_VL_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16}


def captioner_decode(tiny: bool, new_tokens: int) -> dict[str, Any]:
    """Generate ``new_tokens`` greedily for the captioning prompt's two images (448 px crop + 448 px image)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    device = _device()
    text = {**QWEN2_VL_7B_TEXT}
    vision = {**QWEN2_VL_VISION}
    if tiny:
        text = {
            **text,
            "vocab_size": 152064,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision)
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    if tiny:
        config.text_config.rope_parameters["mrope_section"] = [2, 3, 3]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = Qwen2VLForConditionalGeneration(config).to(dtype=dtype).eval()
    grid = 32  # 448 px / 14: 1024 patches, 256 merged image tokens per image
    patch_dim = 3 * 2 * 14 * 14
    pixel_values = torch.randn(2 * grid * grid, patch_dim, device=device, dtype=dtype)
    image_grid_thw = torch.tensor([[1, grid, grid]] * 2, device=device)
    per_image = grid * grid // 4
    prompt: list[int] = [151644, 872, 198]
    for _ in range(2):
        prompt += [config.vision_start_token_id] + [config.image_token_id] * per_image + [config.vision_end_token_id]
    prompt += [*range(1000, 1080), 151645, 198, 151644, 77091, 198]  # ~80 prompt tokens, then the assistant turn
    input_ids = torch.tensor([prompt], device=device)

    def generate() -> None:
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )

    timing = _timed(generate, 1, 1)
    return {
        "model": "Qwen2-VL-7B-shape",
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "s_per_caption": timing["seconds"],
        "tokens_per_s": new_tokens / timing["seconds"],
        "peak_gib": timing["peak_gib"],
    }


# ---- vLLM hook ------------------------------------------------------------------------------------
def vllm_section(tiny: bool) -> dict[str, Any]:
    """The vLLM captioner section lives in ``benchmarks/gpu_check_vllm.py`` (``run(tiny) -> dict``)."""
    try:
        importlib.import_module("vllm")
    except ImportError:
        return {"skipped": "vllm is not installed"}
    try:
        hook = importlib.import_module("benchmarks.gpu_check_vllm")
    except ImportError:
        return {"skipped": "benchmarks/gpu_check_vllm.py is not there yet"}
    return hook.run(tiny)


# ---- the command ----------------------------------------------------------------------------------
def sections(tiny: bool) -> dict[str, Callable[[], Any]]:
    """Name -> zero-argument runner, in the order they run."""
    batch_1p5k, batch_4k = (2, 2) if tiny else (16, 8)
    repeats = 1 if tiny else 3
    vit_sizes = (112, 224) if tiny else (1512, 3780)
    return {
        "ps3": lambda: [ps3_step("1.5k", batch_1p5k, tiny, 1, repeats), ps3_step("4k", batch_4k, tiny, 1, repeats)],
        "vit": lambda: [vit_step(vit_sizes[0], 1, tiny, 1, repeats), vit_step(vit_sizes[1], 1, tiny, 1, repeats)],
        "sam2": lambda: sam2_amg(tiny, 1 if tiny else 2),
        "captioner": lambda: captioner_decode(tiny, 4 if tiny else 128),
        "vllm": lambda: vllm_section(tiny),
    }


def run(tiny: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Run the sections (all, or ``only``); a failing one records its error and the others still run."""
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "tiny": tiny,
    }
    for name, section in sections(tiny).items():
        if only and name not in only:
            continue
        began = time.perf_counter()
        try:
            results[name] = section()
        except Exception as error:  # one broken section must not hide the others' figures
            logger.exception("section %s failed", name)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        logger.info("%s (%.0f s): %s", name, time.perf_counter() - began, json.dumps(results[name], default=str))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the test suite)")
    parser.add_argument("--only", nargs="*", choices=list(sections(True)), help="run only these sections")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = run(args.tiny, args.only)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

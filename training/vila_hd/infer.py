"""``ps3-engine infer vila-hd``: answer one question about one image with a chosen high-res token budget.

The model comes from a training checkpoint folder (local or ``s3://``; it holds ``state.pt``,
``recipe.json`` and the tokenizer) or, without one, is the tiny random model with the tiny tokenizer
(a smoke test of the whole path; its answers are noise).

    answer("photo.jpg", "What does the sign say?", checkpoint="s3://bucket/training/full/checkpoint_000100",
           num_select=2560)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ps3_engine.infra.storage import S3Settings, read_uri_bytes
from ps3_engine.training.vila_hd.config import VilaHDConfig
from ps3_engine.training.vila_hd.model import VilaHD
from ps3_engine.training.vila_hd.sequence import resolve_budget
from ps3_engine.training.vila_hd.tiny_tokenizer import build_tiny_chat_tokenizer
from ps3_engine.training.vila_hd.tokenizer import load_chat_tokenizer, resolve_folder


@dataclass(frozen=True)
class InferResult:
    answer: str
    num_vision_tokens: int  # LLM tokens for the image: low-res + kept high-res
    num_selected_patches: int  # high-res patches PS3 encoded
    num_select: int  # the budget asked for


def load_for_inference(
    checkpoint: str | None = None, s3: S3Settings | None = None, device: str = "cpu"
) -> tuple[VilaHD, Any]:
    """(model in eval mode, tokenizer) from a checkpoint folder, or the tiny random model without one."""
    import torch

    if checkpoint is None:
        cache = Path(os.environ.get("PS3_CACHE", "~/.cache/ps3-engine")).expanduser() / "vila-hd-tiny-tokenizer"
        tokenizer = load_chat_tokenizer(str(build_tiny_chat_tokenizer(cache)))
        torch.manual_seed(0)
        return VilaHD.from_config(VilaHDConfig.tiny(), tokenizer).to(device).eval(), tokenizer
    folder = Path(resolve_folder(checkpoint, s3))
    recipe = json.loads((folder / "recipe.json").read_text())
    cfg = VilaHDConfig.model_validate(recipe["model"])
    tokenizer = load_chat_tokenizer(str(folder / "tokenizer"))
    model = VilaHD.from_config(cfg, tokenizer, load_weights=False, s3=s3)
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer


def answer(
    image: str,
    question: str,
    checkpoint: str | None = None,
    *,
    num_select: int | None = None,
    num_look_close: int | None = None,
    look_close_mode: str | None = None,
    max_new_tokens: int = 64,
    s3: S3Settings | None = None,
    device: str = "cpu",
    loaded: tuple[VilaHD, Any] | None = None,
) -> InferResult:
    """Answer ``question`` about the image at ``image`` (a path or ``s3://`` URI).

    Args:
        num_select: high-res patches to encode (default: the model's training budget).
        num_look_close: instead of ``num_select``, this many selection rounds of ``max_select`` patches.
        look_close_mode: ``after_prompt`` (top-down, default) or ``after_image`` (bottom-up).
        loaded: a ``load_for_inference`` result to reuse (otherwise ``checkpoint`` is loaded).
    """
    import torch

    from ps3_engine.training.ps3.data import decode_oriented
    from ps3_engine.training.vila_hd.data import image_pixels

    model, tokenizer = loaded or load_for_inference(checkpoint, s3, device)
    ps3 = model.cfg.ps3
    budget = resolve_budget(num_select, num_look_close, ps3.max_select, model.cfg.num_select)
    pixels = image_pixels(decode_oriented(read_uri_bytes(image, s3)), max(ps3.scales))
    images = torch.from_numpy(pixels)[None].to(device)
    out = model.generate(
        images, question, tokenizer, max_new_tokens=max_new_tokens, num_select=budget, look_close_mode=look_close_mode
    )
    return InferResult(out.texts[0], out.num_vision_tokens[0], out.num_selected_patches, budget)

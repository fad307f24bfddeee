"""A tiny Qwen2-VL captioner built entirely locally: the embedded default for the demo and the tests.

No weights can be downloaded here, so the demo captioner is built from a config: a byte-level BPE
tokenizer trained on a few hundred synthetic scene descriptions, a Qwen2-VL with a few hundred
thousand parameters, and a short training run on (synthetic scene, description) pairs so that it
answers in short sentences and stops. Its captions are about as good as its training data (colours
and shapes of the generated scenes): it exercises the real loading and generation code of the
transformers backend, it is not a useful captioner.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ps3_engine.training.common.bpe import train_byte_level_bpe

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "orange": (240, 140, 30),
    "purple": (130, 50, 160),
}
SHAPES = ("square", "circle", "stripe")
PLACES = ("in the top left", "in the top right", "near the centre", "at the bottom", "on the left", "on the right")


def _draw_scene(rng: random.Random, size: int = 112) -> tuple[Image.Image, str]:
    background, colour = rng.sample(sorted(COLOURS), 2)
    shape, place = rng.choice(SHAPES), rng.choice(PLACES)
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(10, size - 50), rng.randint(10, size - 50)
    if shape == "square":
        draw.rectangle((x, y, x + 36, y + 36), fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse((x, y, x + 36, y + 36), fill=COLOURS[colour])
    else:
        draw.rectangle((x, y, x + 40, y + 10), fill=COLOURS[colour])
    second = rng.choice(["It has sharp edges.", "Its outline is smooth.", "It stands alone.", "It is small."])
    text = f"A {colour} {shape} {place} on a {background} surface. {second}"
    return image, text


def _train_tokenizer(texts: list[str]):
    wrapped = train_byte_level_bpe(
        texts, 640, SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_captioner(out_dir: str | Path, *, train_steps: int = 120, seed: int = 0) -> Path:
    """Build, briefly train and save a tiny Qwen2-VL captioner to ``out_dir`` (skipped if present)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from ps3_engine.stages.captioning.prompts import PS3_GLOBAL_PROMPT, PS3_LOCAL_PROMPT

    out = Path(out_dir)
    marker = out / "ps3_tiny_captioner.json"
    if marker.is_file():
        return out
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scenes = [_draw_scene(rng) for _ in range(256)]
    tokenizer = _train_tokenizer([text for _, text in scenes] + [PS3_LOCAL_PROMPT, PS3_GLOBAL_PROMPT] * 20)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden, heads = 64, 2
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|im_start|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    _train(model, processor, scenes, train_steps, rng)
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    # transformers draws a one-step "Writing model shards" bar on the demo's console (a log file shows it
    # as carriage-return garbage); the log line below says the same.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    marker.write_text(json.dumps({"train_steps": train_steps, "seed": seed, "parameters": model.num_parameters()}))
    logger.info("tiny captioner (%d parameters) saved to %s", model.num_parameters(), out)
    return out


def _train(model, processor, scenes: list[tuple[Image.Image, str]], steps: int, rng: random.Random) -> None:
    """Teach the answer format: short template sentences ending with <|im_end|> after both prompts."""
    import torch

    from ps3_engine.stages.captioning.prompts import PS3_GLOBAL_PROMPT, PS3_LOCAL_PROMPT

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    batch_size = 4
    for step in range(steps):
        texts, images = [], []
        for image, caption in rng.sample(scenes, batch_size):
            if rng.random() < 0.5:
                parts, prompt, imgs = [{"type": "image"}], PS3_GLOBAL_PROMPT, [image]
            else:
                crop = image.crop((28, 28, 84, 84)).resize((112, 112))
                parts, prompt, imgs = [{"type": "image"}, {"type": "image"}], PS3_LOCAL_PROMPT, [image, crop]
            messages = [
                {"role": "user", "content": [*parts, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": caption},
            ]
            texts.append(processor.apply_chat_template(messages, tokenize=False).rstrip("\n"))
            images.append(imgs)
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = inputs["input_ids"].clone()
        # Loss only on the answer: everything up to the last "<|im_start|>assistant\n" is context.
        start_id = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        for row in range(labels.shape[0]):
            starts = np.nonzero(labels[row].numpy() == start_id)[0]
            labels[row, : int(starts[-1]) + 3] = -100
        labels[inputs["attention_mask"] == 0] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 40 == 0 or step == steps - 1:
            logger.info("tiny captioner step %d/%d loss %.3f", step + 1, steps, float(loss.detach()))
    model.eval()

"""The tiny VILA-HD chat tokenizer for tests and the ``debug`` recipe: a byte-level BPE trained here.

Its training text is the synthetic question and answer templates (``data``, ``synthetic``) rendered in
the chat format (``tokenizer``), so no hub download is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ps3_engine.training.common.bpe import train_byte_level_bpe
from ps3_engine.training.tiny_captioner import COLOURS, PLACES, SHAPES
from ps3_engine.training.vila_hd.data import DESCRIBE_TEMPLATES, QUESTION_TEMPLATES
from ps3_engine.training.vila_hd.synthetic import SYNTHETIC_QUESTION, describe_quadrant
from ps3_engine.training.vila_hd.tokenizer import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TINY_VOCAB,
    TURN_END,
    render_conversation,
)


def _corpus_lines() -> list[str]:
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            for place in PLACES:
                subject = f"a {colour} {shape} {place}"
                lines += [t.format(subject=subject) for t in QUESTION_TEMPLATES["natural"] + DESCRIBE_TEMPLATES]
                lines.append(f"A {colour} {shape} {place} on a plain surface. It has sharp edges.")
        lines.append(SYNTHETIC_QUESTION.format(colour=colour))
        lines += [describe_quadrant(colour, q) for q in range(4)]
    lines += [t.format(subject="a sign with small text") for t in QUESTION_TEMPLATES["document"]]
    return [render_conversation([("user", line), ("assistant", line)]) for line in lines]


def build_tiny_chat_tokenizer(out_dir: str | Path, vocab_size: int = TINY_VOCAB) -> Path:
    """Train a byte-level BPE with the chat special tokens and save it as a HF fast tokenizer (once)."""
    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    wrapped = train_byte_level_bpe(
        _corpus_lines() * 2,
        vocab_size,
        SPECIAL_TOKENS,
        pad_token=PAD_TOKEN,
        eos_token=TURN_END,
        unk_token=None,
        additional_special_tokens=[IMAGE_TOKEN],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(out)
    (out / "vila_hd_tiny_tokenizer.json").write_text(json.dumps({"vocab_size": len(wrapped)}))
    return out

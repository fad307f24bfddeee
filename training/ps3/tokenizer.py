"""A small text tokenizer trained locally, for the ``debug`` recipe and tests (no hub downloads here).

Production recipes take the SigLIP tokenizer saved next to the pretrained weights instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from ps3_engine.training.tiny_captioner import COLOURS, PLACES, SHAPES

TINY_TEXT_VOCAB = 512


def _corpus_lines() -> list[str]:
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            for place in PLACES:
                lines.append(f"A {colour} {shape} {place} on a plain surface. It has sharp edges.")
    lines += ["The second image is a close-up of a sign with text.", "A small detailed patch with dots and text."]
    return lines


def build_tiny_text_tokenizer(out_dir: str | Path, vocab_size: int = TINY_TEXT_VOCAB) -> Path:
    """Train a byte-level BPE with pad/eos tokens and save it as a HF fast tokenizer (once)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus_lines() * 4, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(out)
    (out / "ps3_tiny_tokenizer.json").write_text(json.dumps({"vocab_size": len(wrapped)}))
    return out

"""Text tokenizers: the SigLIP one the paper recipes load, and a small one trained locally for ``debug``.

Production recipes take the SigLIP tokenizer saved next to the pretrained weights (``spiece.model`` +
``tokenizer_config.json``, a sentencepiece model that transformers opens as ``SiglipTokenizer`` only when
the ``sentencepiece`` package is installed; it is in the ``models`` extra).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ps3_engine.training.common.bpe import train_byte_level_bpe
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
    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    wrapped = train_byte_level_bpe(
        _corpus_lines() * 4,
        vocab_size,
        ["<pad>", "</s>", "<unk>"],
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    wrapped.save_pretrained(out)
    (out / "ps3_tiny_tokenizer.json").write_text(json.dumps({"vocab_size": len(wrapped)}))
    return out


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(path: str, s3: Any = None, cache_dir: str = "~/.cache/ps3-engine/weights") -> Any:
    """The tokenizer in folder ``path`` (local, or an ``s3://`` prefix copied once to ``cache_dir``), cached.

    Raises:
        ValueError: the folder holds no tokenizer that this install can open (e.g. a SigLIP sentencepiece
            model without the ``sentencepiece`` package).
    """
    from transformers import AutoTokenizer

    from ps3_engine.training.ps3.model import resolve_checkpoint_dir

    folder = resolve_checkpoint_dir(path, cache_dir, s3) if path.startswith("s3://") else str(Path(path).expanduser())
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (ImportError, ValueError, OSError, TypeError, RuntimeError) as error:
        has_spiece = (Path(folder) / "spiece.model").is_file()
        hint = (
            " (a sentencepiece model: install the `sentencepiece` package, in the models extra)" if has_spiece else ""
        )
        raise ValueError(f"cannot load a tokenizer from {path!r}{hint}: {type(error).__name__}: {error}") from error

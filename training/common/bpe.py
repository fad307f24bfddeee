"""One recipe for the tiny byte-level BPE tokenizers that tests, the demo and debug recipes train locally.

No tokenizer can be downloaded on the project's machines (``../shared/reference/environment.md`` section 4),
so the tiny models carry their own: a byte-level BPE (any text round-trips) with the model's special tokens,
wrapped as a Hugging Face fast tokenizer so that it saves and reloads like a real checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def train_byte_level_bpe(lines: Iterable[str], vocab_size: int, special_tokens: list[str], **wrap: Any) -> Any:
    """Train a byte-level BPE on ``lines`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        lines: training text.
        vocab_size: target vocabulary, special tokens included.
        special_tokens: tokens kept whole (pad, eos, chat and image markers...).
        **wrap: keyword arguments of ``PreTrainedTokenizerFast`` (``pad_token``, ``eos_token``...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar writes blank lines to a stdout that is not a terminal
    )
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **wrap)

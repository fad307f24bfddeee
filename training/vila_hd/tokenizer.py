"""The chat format of VILA-HD: Qwen2 turns with one ``<image>`` placeholder, and a tiny locally trained tokenizer.

A conversation is encoded piece by piece, the way the chat template below renders it::

    <|im_start|>user\\n<image>\\nWhat is red?<|im_end|>\\n<|im_start|>assistant\\nA square.<|im_end|>\\n

The image placeholder opens the first user turn; the model replaces it with the image tokens. Only the
assistant text and its ``<|im_end|>`` are supervised. The last token before the first ``<|im_end|>``
after the placeholder is the "last user-prompt token" whose hidden state drives top-down selection.

Production takes the Qwen2 tokenizer saved with the LLM; :func:`add_image_token` registers the
placeholder there. Tests and the ``debug`` recipe use ``tiny_tokenizer.build_tiny_chat_tokenizer`` (no
hub downloads here), a byte-level BPE trained on the synthetic question and answer templates; it lives
in its own module because it reads the templates of ``data`` and ``synthetic``, which import this one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ps3_engine.infra.storage import S3Settings

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, TURN_START, TURN_END, IMAGE_TOKEN]
IGNORE_INDEX = -100
TINY_VOCAB = 640
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def encode_conversation(
    tokenizer: Any, turns: Sequence[tuple[str, str]], *, add_generation_prompt: bool = False, supervise: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and labels of ``turns`` (``(role, text)`` pairs), the image placeholder in the first user turn.

    Labels are ``IGNORE_INDEX`` everywhere except on assistant text and its closing ``<|im_end|>``
    (everywhere when ``supervise`` is False: selection-only samples).

    Raises:
        ValueError: when no turn is a user turn or a role is unknown.
    """
    if not any(role == "user" for role, _ in turns):
        raise ValueError("a conversation needs a user turn")
    ids: list[int] = []
    labels: list[int] = []
    placed = False

    def add(text: str, learn: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    for role, text in turns:
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"unknown role {role!r}")
        add(f"{TURN_START}{role}\n", False)
        if role == "user" and not placed:
            text, placed = f"{IMAGE_TOKEN}\n{text}", True
        add(text + TURN_END, supervise and role == "assistant")
        add("\n", False)
    if add_generation_prompt:
        add(f"{TURN_START}assistant\n", False)
    return ids, labels


def render_conversation(turns: Sequence[tuple[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The text :func:`encode_conversation` tokenises (what ``CHAT_TEMPLATE`` renders)."""
    parts, placed = [], False
    for role, text in turns:
        if role == "user" and not placed:
            text, placed = f"{IMAGE_TOKEN}\n{text}", True
        parts.append(f"{TURN_START}{role}\n{text}{TURN_END}\n")
    return "".join(parts) + (f"{TURN_START}assistant\n" if add_generation_prompt else "")


def add_image_token(tokenizer: Any) -> Any:
    """Register ``<image>`` as a special token and set the chat template (a production Qwen2 tokenizer)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def resolve_folder(uri: str, s3: S3Settings | None = None) -> str:
    """A local folder for ``uri``: the path itself, or an ``s3://`` prefix copied once to a local cache.

    Raises:
        ValueError: a local path that is not a folder.
    """
    if uri.startswith("s3://"):
        from ps3_engine.stages.captioning.weights import resolve_model_dir

        cache = Path(os.environ.get("PS3_CACHE", "~/.cache/ps3-engine")).expanduser() / "vila-hd"
        return resolve_model_dir(uri, str(cache), s3)
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{uri!r} is not a folder")
    return str(folder)


@functools.lru_cache(maxsize=8)
def load_chat_tokenizer(uri: str, s3: S3Settings | None = None) -> Any:
    """The tokenizer in folder ``uri`` (local or ``s3://``) with ``<image>`` and the chat template; once per process."""
    from transformers import AutoTokenizer

    return add_image_token(AutoTokenizer.from_pretrained(resolve_folder(uri, s3)))

"""Token-sequence helpers of VILA-HD: where the image and the user prompt sit, and splicing in vision tokens.

All pure tensor functions; rows are right-padded chat sequences with exactly one ``<image>`` each.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from ps3_engine.training.vila_hd.tokenizer import IGNORE_INDEX


def find_image_positions(input_ids: Tensor, image_token_id: int) -> Tensor:
    """Index ``[B]`` of the one image placeholder of each row.

    Raises:
        ValueError: a row without exactly one placeholder.
    """
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if bool((counts != 1).any()):
        raise ValueError(f"every row needs exactly one image placeholder, got counts {counts.tolist()}")
    return is_image.int().argmax(1)


def find_prompt_ends(input_ids: Tensor, image_pos: Tensor, end_token_id: int) -> Tensor:
    """Index ``[B]`` of the last user-prompt token: the token before the first end-of-turn after the image.

    Raises:
        ValueError: a row whose user turn is not closed (truncated).
    """
    after = torch.arange(input_ids.shape[1], device=input_ids.device)[None] > image_pos[:, None]
    ends = (input_ids == end_token_id) & after
    if not bool(ends.any(1).all()):
        raise ValueError("a row has no end-of-turn token after its image: the user turn was truncated")
    return ends.int().argmax(1) - 1


def splice_vision(
    text_embeds: Tensor, image_pos: Tensor, lengths: Tensor, vision: list[Tensor], labels: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Replace row b's placeholder by ``vision[b]`` and keep its first ``lengths[b]`` text tokens; right-pad.

    Returns embeddings ``[B, L, H]``, an attention mask ``[B, L]`` (long) and labels (``IGNORE_INDEX`` on
    vision tokens and padding) when given.
    """
    rows, label_rows = [], []
    for row, (pos, length, tokens) in enumerate(zip(image_pos.tolist(), lengths.tolist(), vision, strict=True)):
        text = text_embeds[row]
        rows.append(torch.cat([text[:pos], tokens.to(text.dtype), text[pos + 1 : length]]))
        if labels is not None:
            ignore = labels.new_full((tokens.shape[0],), IGNORE_INDEX)
            label_rows.append(torch.cat([labels[row, :pos], ignore, labels[row, pos + 1 : length]]))
    sizes = torch.tensor([r.shape[0] for r in rows], device=text_embeds.device)
    embeds = pad_sequence(rows, batch_first=True)
    mask = (torch.arange(embeds.shape[1], device=embeds.device)[None] < sizes[:, None]).long()
    spliced = pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX) if labels is not None else None
    return embeds, mask, spliced


def left_align(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded rows -> left-padded rows (generation appends at the right end)."""
    shift = embeds.shape[1] - mask.sum(1)
    index = (torch.arange(embeds.shape[1], device=embeds.device)[None] - shift[:, None]) % embeds.shape[1]
    return embeds.gather(1, index[..., None].expand_as(embeds)), mask.gather(1, index)


def resolve_budget(num_select: int | None, num_look_close: int | None, max_select: int, default: int) -> int:
    """High-res patches per image: ``num_select``, or ``num_look_close`` rounds of ``max_select``, or the default.

    Raises:
        ValueError: both given, or a negative value.
    """
    if num_select is not None and num_look_close is not None:
        raise ValueError("give num_select or num_look_close, not both")
    if num_look_close is not None:
        if num_look_close < 0:
            raise ValueError(f"num_look_close must be >= 0, got {num_look_close}")
        return num_look_close * max_select
    if num_select is not None and num_select < 0:
        raise ValueError(f"num_select must be >= 0, got {num_select}")
    return default if num_select is None else num_select

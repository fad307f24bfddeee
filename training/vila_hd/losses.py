"""VILA-HD losses: next-token loss on the supervised tokens and selection BCE + Dice against evidence boxes.

Both are per-rank means (DDP averages the gradients over ranks). The selection loss follows the VILA
trainer (spec 5.2): per high-res scale, binary cross-entropy plus ``1 - 2 sum(p t) / (sum(p) + sum(t))``
(eps 1e-6) between the selection probabilities and the box map, averaged over scales, in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor

from ps3_engine.training.vila_hd.tokenizer import IGNORE_INDEX

DICE_EPS = 1e-6


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``, mean over supervised tokens.

    A batch without supervised tokens (selection-only samples) gives a zero still attached to ``logits``
    instead of the NaN of an empty mean.
    """
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def bce_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy, logs clamped at -100 like ``F.binary_cross_entropy``, but a NaN
    probability gives a NaN loss (the trainer then stops) instead of an exception."""
    probs, targets = probs.float(), targets.float()
    log_p, log_not_p = probs.log().clamp(min=-100), (1 - probs).log().clamp(min=-100)
    return -(targets * log_p + (1 - targets) * log_not_p).mean()


def dice_loss(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean over samples of ``1 - 2 sum(p t) / (sum(p) + sum(t) + eps)`` on ``[B, ...]`` maps."""
    probs, targets = probs.flatten(1).float(), targets.flatten(1).float()
    overlap = (probs * targets).sum(1)
    return (1 - 2 * overlap / (probs.sum(1) + targets.sum(1) + DICE_EPS)).mean()


def selection_loss(probs: list[Tensor], targets: list[Tensor], has_evidence: Tensor) -> Tensor:
    """BCE + Dice per scale over the samples with an evidence box, averaged over scales.

    Returns a zero attached to ``probs`` when no sample has evidence (every selection parameter still
    takes part in the graph).
    """
    if not probs:
        return torch.zeros((), device=has_evidence.device)
    if not bool(has_evidence.any()):
        return torch.stack([p.float().sum() for p in probs]).sum() * 0.0
    per_scale = []
    with torch.autocast(device_type=probs[0].device.type, enabled=False):
        for prob, target in zip(probs, targets, strict=True):
            prob, target = prob[has_evidence], (target[has_evidence] > 0).float()
            per_scale.append(bce_loss(prob, target) + dice_loss(prob, target))
    return torch.stack(per_scale).mean()

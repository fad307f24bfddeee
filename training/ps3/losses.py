"""PS3 pre-training losses (spec section 3): the SigLIP sigmoid loss and the box supervision of selection.

Scaling convention across ranks (tested in ``tests/training/test_ps3_losses.py``)
--------------------------------------------------------------------------------
Each rank holds ``b`` images and ``b`` texts (equal local batches; ``N = W * b`` globally). With
``gather=True`` a rank all-gathers the texts *with gradients* and computes its own images against all
``N`` texts, normalised by its *local* image count::

    loss_r = -1/b * sum_{i in rank r} sum_{j < N} logsigmoid(label_ij * (scale * img_i . txt_j + bias))

The ``N x N`` pairs are split across ranks without overlap, so ``mean_r loss_r`` equals the
single-process loss ``L`` over the concatenated batch, and the gradient every rank receives for its own
embeddings (text gradients are summed back over ranks by the all-gather's backward) is
``W * dL/d(local embeddings)``; the same holds for the logit scale and bias summed over ranks. DDP averages
parameter gradients over ranks, which divides by ``W`` again, so a DDP step on ``loss_r`` is exactly a step
on the global loss ``L``. (OpenCLIP's neighbour-exchange SigLipLoss has the same convention; it exchanges
texts ring-wise instead of gathering them all at once, which saves memory at very large batches.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn


def _distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gathered gradient over ranks and keeps this rank's rows.

    A plain all-reduce does the summing, so it works on every backend (gloo has no reduce-scatter);
    ``torch.distributed.nn.functional.all_gather`` did the same and is deprecated as of torch 2.14.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """All-gather ``tensor`` [b, D] from every rank into [W * b, D], keeping the autograd graph.

    Every rank must pass the same shape (drop the last incomplete batch).
    """
    return _GatherWithGrad.apply(tensor)


def siglip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    gather: bool = True,
) -> Tensor:
    """SigLIP sigmoid pairwise loss of L2-normalised ``image_embeds`` [b, D] against ``text_embeds`` [b, D].

    Labels are +1 for (image i, text i) and -1 elsewhere; the loss is the negative log-sigmoid summed
    over texts and averaged over this rank's images. With an initialised process group of world size > 1
    and ``gather=True`` the texts of all ranks are negatives too (see the module docstring for how the
    per-rank losses and gradients relate to the global loss). ``logit_scale`` is already exponentiated.

    Raises:
        ValueError: when the two embedding batches differ in shape.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image {tuple(image_embeds.shape)} and text {tuple(text_embeds.shape)} embeds differ")
    rank, world_size = _distributed_world()
    num_local = image_embeds.shape[0]
    offset = 0
    if gather and world_size > 1:
        text_embeds = gather_with_grad(text_embeds)
        offset = rank * num_local
    logits = logit_scale * image_embeds @ text_embeds.T + logit_bias  # [b, N]
    labels = -torch.ones_like(logits)
    local = torch.arange(num_local, device=logits.device)
    labels[local, local + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / max(num_local, 1)


def selection_bce(probs: list[Tensor], targets: list[Tensor], local_mask: Tensor) -> Tensor:
    """Binary cross-entropy between per-scale selection probabilities [B, h, w] and GT maps, in fp32.

    Targets are thresholded at > 0 (the GT map is area-downsampled to each grid before it gets here).
    Only samples with ``local_mask`` set count (global-caption samples have no box to supervise);
    the per-scale means over those samples' cells are averaged over scales. Returns a zero that is still
    attached to ``probs`` when no sample is local, so every selection parameter gets a (zero) gradient.
    """
    if len(probs) != len(targets):
        raise ValueError(f"{len(probs)} probability maps but {len(targets)} target maps")
    if not probs:
        return torch.zeros((), device=local_mask.device)
    if not bool(local_mask.any()):
        return torch.stack([p.float().sum() for p in probs]).sum() * 0.0
    device_type = probs[0].device.type
    per_scale = []
    with torch.autocast(device_type=device_type, enabled=False):
        for prob, target in zip(probs, targets, strict=True):
            prob_local = prob[local_mask].float()
            target_local = (target[local_mask] > 0).float()
            per_scale.append(F.binary_cross_entropy(prob_local, target_local))
    return torch.stack(per_scale).mean()


def ps3_loss(outputs: dict[str, Any], *, prior_weight: float = 1.0, posterior_weight: float = 1.0) -> dict[str, Tensor]:
    """Total PS3 pre-training loss from the dict ``PS3CLIP.forward`` returns.

    ``total = contrastive + prior_weight * prior_bce + posterior_weight * posterior_bce`` where the prior
    term supervises the bottom-up (``prior_prompt``) selection and the posterior term the top-down
    (caption-prompted) selection, both with the single sampled box (the code's choice, spec section 3.2).
    ``topdown_probs`` may be None (no prompt), which makes the posterior term zero; ``is_global`` None
    means every sample is local.
    """
    contrastive = siglip_loss(
        outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"], outputs["logit_bias"]
    )
    is_global = outputs.get("is_global")
    if is_global is None:  # no flags: every sample has a box
        is_global = torch.zeros(
            outputs["image_embeds"].shape[0], dtype=torch.bool, device=outputs["image_embeds"].device
        )
    local_mask = ~is_global.bool()
    prior = selection_bce(outputs["bottomup_probs"], outputs["gt_targets"], local_mask)
    topdown = outputs.get("topdown_probs")
    posterior = (
        selection_bce(topdown, outputs["gt_targets"], local_mask) if topdown is not None else torch.zeros_like(prior)
    )
    total = contrastive + prior_weight * prior + posterior_weight * posterior
    return {"total": total, "contrastive": contrastive, "prior_bce": prior, "posterior_bce": posterior}


class PS3Loss(nn.Module):
    """``ps3_loss`` as a module with its weights fixed at construction (what the trainer holds)."""

    def __init__(self, prior_weight: float = 1.0, posterior_weight: float = 1.0) -> None:
        super().__init__()
        self.prior_weight = prior_weight
        self.posterior_weight = posterior_weight

    def forward(self, outputs: dict[str, Any]) -> dict[str, Tensor]:
        return ps3_loss(outputs, prior_weight=self.prior_weight, posterior_weight=self.posterior_weight)

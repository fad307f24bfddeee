"""Which high-res patches PS3 looks at (spec 2.3 and the budget part of 2.4).

``PatchSelector`` turns low-res hidden states, a shallow conv map of the high-res image and a prompt
(top-down: a projected text embedding; bottom-up: the learned ``prior_prompt``) into a selection
probability per patch. The pure functions below split the patch budget across scales and take the
top-k per scale; every sample of a batch gets the same number of patches per scale, so the top-k is
batched instead of the reference's per-sample loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn

from ps3_engine.training.ps3.layers import Mlp, ShallowConvNet

LOGIT_MULTIPLIER = 5.0
LOGIT_CLAMP = 10.0


def split_budget(num_select: int, highres_scales: list[int]) -> list[int]:
    """Split a patch budget across the high-res scales by pixel share; the last scale takes the rounding rest.

    1.5K: 2560 -> [512, 2048]; 4K: 2560 -> [85, 341, 2134] (the reference code's numbers).
    """
    pixels = [s * s for s in highres_scales]
    quotas = [num_select * p // sum(pixels) for p in pixels]
    quotas[-1] += num_select - sum(quotas)
    return quotas


def scale_quotas(quotas: list[int], num_select: int) -> list[int]:
    """A full round's per-scale quotas rescaled to ``num_select`` patches, the rest to the last scale.

    The reference's rescaling (``int(q * n / sum(q))``) for a round with a smaller token budget.
    """
    total = sum(quotas)
    scaled = [q * num_select // total for q in quotas]
    scaled[-1] += num_select - sum(scaled)
    return scaled


def round_plan(num_select: int, quotas: list[int], num_patches: int) -> list[list[int]]:
    """The per-scale quotas of each selection round for a budget of ``num_select`` high-res patches.

    As the reference's ``num_look_close`` / ``num_token_look_close``: a budget that covers every patch
    (``num_select >= num_patches``, "all") runs ``ceil(num_patches / round)`` full rounds, whose roll-over
    takes every patch (4K: 35 rounds, 87,480 patches; 1.5K: 6 rounds, 14,580). A smaller budget runs full
    rounds and a last one rescaled to the remainder (``scale_quotas``). Per-round roll-over (``roll_over``)
    happens at selection time, against the patches still free.
    """
    per_round = sum(quotas)
    if num_select <= 0 or per_round == 0:
        return []
    if num_select >= num_patches:
        return [list(quotas)] * -(-num_patches // per_round)
    num_rounds = -(-num_select // per_round)
    last = num_select - (num_rounds - 1) * per_round
    return [list(quotas)] * (num_rounds - 1) + [scale_quotas(quotas, last)]


def take_leftovers(num_free: list[int], max_select: int) -> list[int]:
    """Quotas for a round over the patches still free, low scales first, at most ``max_select`` in all."""
    quotas, room = [], max_select
    for free in num_free:
        quotas.append(min(free, room))
        room -= quotas[-1]
    return quotas


def roll_over(quotas: list[int], num_free: list[int]) -> list[int]:
    """Cap each scale's quota at its free patches; what a scale cannot take rolls to the next scale.

    What the last scale cannot take is dropped (as in the reference).
    """
    counts, carry = [], 0
    for quota, free in zip(quotas, num_free, strict=True):
        want = quota + carry
        counts.append(min(want, free))
        carry = want - counts[-1]
    return counts


@torch.no_grad()
def select_top_k(scores: list[Tensor], quotas: list[int], taken: list[Tensor] | None = None) -> list[Tensor]:
    """Per scale, the indices ``[B, k_s]`` (ascending) of the highest-scoring patches not yet taken.

    Args:
        scores: per high-res scale, scores ``[B, N_s]`` over its flattened patch grid.
        quotas: the patch budget per scale, before rolling over.
        taken: per scale, a bool mask ``[B, N_s]`` of patches chosen in earlier rounds; every sample must
            have the same number taken per scale (true when all rounds used the same quotas).
    """
    if taken is None:
        taken = [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    num_free = []
    for mask in taken:
        free = mask.shape[1] - mask.sum(dim=1)
        assert bool((free == free[0]).all()), "every sample must have the same number of free patches"
        num_free.append(int(free[0]))
    counts = roll_over(quotas, num_free)
    selected = []
    for score, mask, k in zip(scores, taken, counts, strict=True):
        score = score.float().masked_fill(mask, -math.inf)
        selected.append(score.topk(k, dim=1).indices.sort(dim=1).values)
    return selected


def area_downsample(maps: Tensor, grid: int) -> Tensor:
    """Mean of a pixel map over each cell of a ``grid x grid`` patch grid, ``[B, grid, grid]``."""
    return F.interpolate(maps[:, None].float(), size=(grid, grid), mode="area")[:, 0]


def upsample_nearest(maps: Tensor, grid: int) -> Tensor:
    return F.interpolate(maps[:, None].float(), size=(grid, grid), mode="nearest")[:, 0].to(maps.dtype)


class PatchSelector(nn.Module):
    """Selection scores (spec 2.3); its parameters are the "token selection" group of the optimiser.

    Args:
        width: vision hidden size (D).
        text_dim: size of the text embedding that becomes the top-down prompt.
        num_select_layers: how many low-res layers are concatenated into the selection features.
        num_scales: number of high-res scales (one feature map and prompt projection each).
        conv_hidden: channels of the shallow conv branch.
        conv_blocks: ConvNeXt blocks in the conv branch.
        conv_kernel: stem kernel and stride of the conv branch (2 x patch size).
    """

    def __init__(
        self,
        width: int,
        text_dim: int,
        num_select_layers: int,
        num_scales: int,
        conv_hidden: int,
        conv_blocks: int,
        conv_kernel: int,
    ) -> None:
        super().__init__()
        self.width, self.num_scales = width, num_scales
        concat = width * num_select_layers
        self.prompt_proj = Mlp(text_dim, width, width)
        self.selection_feature_proj = Mlp(concat, concat, width * num_scales)
        self.prior_prompt = nn.Parameter(torch.randn(width))
        self.conv_branch = ShallowConvNet(conv_hidden, conv_blocks, conv_kernel)
        self.prompt_proj_for_highres = nn.Linear(width, conv_hidden * num_scales)

    def project_prompt(self, text_embeds: Tensor) -> Tensor:
        """Top-down prompt: ``prompt_proj`` of the L2-normalised text embedding."""
        return self.prompt_proj(F.normalize(text_embeds, dim=-1))

    def features(self, hidden_states: list[Tensor], conv_images: Tensor) -> tuple[Tensor, Tensor]:
        """Low-res selection maps ``[B, S, D, g0, g0]`` and the conv-branch map ``[B, C, h, h]``.

        ``hidden_states`` are the low-res hidden states ``[B, g0*g0, D]`` of the selection layers.
        """
        feats = self.selection_feature_proj(torch.cat(hidden_states, dim=-1))
        num_batch, num_tokens, _ = feats.shape
        grid = math.isqrt(num_tokens)
        feats = feats.view(num_batch, grid, grid, self.num_scales, self.width).permute(0, 3, 4, 1, 2)
        return feats, self.conv_branch(conv_images)

    def probabilities(self, feats: Tensor, conv_map: Tensor, prompt: Tensor) -> Tensor:
        """Selection probability ``[B, g0, g0]`` on the low-res grid, the map every scale uses.

        Cosine similarity of the prompt with each low-res map, and of ``prompt_proj_for_highres(prompt)``
        with the conv map (max-pooled to the low-res grid); the two are averaged, scaled by 5, clamped to
        [-10, 10] and squashed by a sigmoid. Only the first scale's map is used, as in the reference, but
        the others stay in the graph with weight 0 so that DDP sees every parameter take part.
        """
        num_batch = prompt.shape[0]
        low = (F.normalize(feats, dim=2) * F.normalize(prompt, dim=-1)[:, None, :, None, None]).sum(2)
        hr_prompt = self.prompt_proj_for_highres(prompt).view(num_batch, self.num_scales, -1)
        high = (F.normalize(conv_map, dim=1)[:, None] * F.normalize(hr_prompt, dim=-1)[..., None, None]).sum(2)
        logits = (low + F.adaptive_max_pool2d(high, low.shape[-2:])) / 2
        probs = torch.sigmoid((logits * LOGIT_MULTIPLIER).clamp(-LOGIT_CLAMP, LOGIT_CLAMP))
        return probs[:, 0] + 0 * probs[:, 1:].sum(dim=1)

    def prior(self, batch_size: int) -> Tensor:
        return self.prior_prompt[None].expand(batch_size, -1)

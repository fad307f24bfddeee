"""The PS3 vision encoder (spec 2.2-2.4) on top of a transformers ``SiglipVisionModel``.

1. Low-res pass: the image at ``scales[0]`` through the whole ViT, keeping every layer's keys and
   values of the low-res tokens (the "low-res KV cache").
2. Selection: a probability per patch from the low-res hidden states, a shallow conv branch on the
   high-res image and a prompt (``selection.PatchSelector``); GT-box patches can be forced to 1.
3. High-res pass: only the top-k patches per scale are embedded (conv weights applied as a matmul on
   unfolded patches), given interpolated position embeddings plus a learned per-scale residual, and run
   as one sequence through the same ViT blocks, each layer attending to that layer's low-res keys and
   values as well. Low-res tokens are never recomputed.

The SigLIP attention-pool head pools either the low-res tokens (global captions) or the high-res tokens
inside the GT box (local captions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ps3_engine.training.ps3.config import PS3ModelConfig
from ps3_engine.training.ps3.layers import block_forward
from ps3_engine.training.ps3.selection import (
    PatchSelector,
    area_downsample,
    round_plan,
    select_top_k,
    take_leftovers,
    upsample_nearest,
)


@dataclass
class LowResPass:
    tokens: Tensor  # [B, N0, D] after the final LayerNorm
    hidden_states: list[Tensor]  # per layer [B, N0, D], output of each block
    kv_cache: list[tuple[Tensor, Tensor]]  # per layer keys and values [B, heads, N0, head_dim]


@dataclass
class PS3VisionOutput:
    """What one PS3 forward returns. Lists "per scale" run over the high-res scales, low to high.

    Attributes:
        pooled: ``[B, D]`` attention-pooled embedding: low-res tokens for global samples, high-res tokens
            (inside the GT box when ``gt_maps`` is given) otherwise.
        low_res_tokens: ``[B, N0, D]``.
        high_res_tokens: ``[B, K, D]``, scale by scale, each scale's patches in raster order.
        selected: per scale, patch indices ``[B, k_s]`` (ascending) into that scale's flattened grid.
        bottomup_probs: per scale ``[B, h_s, w_s]``, from the learned prior prompt (before GT override).
        topdown_probs: same from the text prompt, or None without one.
        selection_probs: per scale, the scores the top-k used (top-down or bottom-up, GT forced to 1).
        gt_targets: per scale ``[B, h_s, w_s]``, 1.0 where the area-downsampled GT map is > 0, or None.
        low_res_pooled: ``[B, D]`` attention pool of the low-res tokens.
    """

    pooled: Tensor
    low_res_tokens: Tensor
    high_res_tokens: Tensor
    selected: list[Tensor]
    bottomup_probs: list[Tensor]
    topdown_probs: list[Tensor] | None
    selection_probs: list[Tensor]
    gt_targets: list[Tensor] | None
    low_res_pooled: Tensor


class PS3VisionModel(nn.Module):
    """PS3 vision encoder.

    Args:
        cfg: scales, budget and selection settings.
        vit: the SigLIP vision tower (random or pretrained); its blocks serve both passes.
        text_dim: size of the text embeddings given as ``prompt_embeds``.
    """

    def __init__(self, cfg: PS3ModelConfig, vit: nn.Module, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = vit
        width = vit.config.hidden_size
        self.selector = PatchSelector(
            width=width,
            text_dim=text_dim,
            num_select_layers=len(cfg.select_layers),
            num_scales=cfg.num_highres_scales,
            conv_hidden=cfg.conv_hidden,
            conv_blocks=cfg.conv_blocks,
            conv_kernel=2 * cfg.patch_size,
        )
        # "Scale-aware PE": a full-grid residual per high-res scale, zero at the start (spec 2.4).
        self.pos_emb_residual = nn.ParameterList([nn.Parameter(torch.zeros(g * g, width)) for g in cfg.grid_sizes[1:]])
        self.gradient_checkpointing = False

    @property
    def highres_grids(self) -> list[int]:
        return self.cfg.grid_sizes[1:]

    # ---- stage 1 -------------------------------------------------------------------------------
    def forward_low_res(self, images: Tensor) -> LowResPass:
        """The image resized to ``scales[0]`` through the full ViT, keeping per-layer hidden states and K/V."""
        x = self.vit.embeddings(_resize(images, self.cfg.scales[0]))
        hidden_states, kv_cache = [], []
        for layer in self.vit.encoder.layers:
            x, keys, values = self._block(layer, x, None)
            hidden_states.append(x)
            kv_cache.append((keys, values))
        return LowResPass(self.vit.post_layernorm(x), hidden_states, kv_cache)

    # ---- stage 2 -------------------------------------------------------------------------------
    def selection_probs(
        self, images: Tensor, hidden_states: list[Tensor], prompt_embeds: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """Bottom-up (prior prompt) and top-down (text prompt) probabilities per high-res scale.

        The first scale's map is used for every scale, nearest-upsampled to its grid, so the same image
        region is selected at each scale (spec 2.3 step 4).
        """
        feats, conv_map = self.selector.features(
            [hidden_states[i] for i in self.cfg.select_layers], _resize(images, self.cfg.conv_input_size)
        )
        prior = self.selector.probabilities(feats, conv_map, self.selector.prior(images.shape[0]))
        bottomup = [upsample_nearest(prior, g) for g in self.highres_grids]
        if prompt_embeds is None:
            return bottomup, None
        posterior = self.selector.probabilities(feats, conv_map, self.selector.project_prompt(prompt_embeds))
        return bottomup, [upsample_nearest(posterior, g) for g in self.highres_grids]

    def force_gt(self, probs: list[Tensor], gt_maps: Tensor) -> list[Tensor]:
        """Probability 1 inside the GT map (area-downsampled to the first high-res grid, then nearest per scale)."""
        first = area_downsample(gt_maps, self.highres_grids[0])
        grids = self.highres_grids
        return [torch.where(upsample_nearest(first, g) > 0, 1.0, p) for g, p in zip(grids, probs, strict=True)]

    # ---- stage 3 -------------------------------------------------------------------------------
    def scale_pos_embed(self, scale_index: int) -> Tensor:
        """Position table ``[g*g, D]`` of high-res scale ``scale_index``: bicubic resize of the low-res
        table plus that scale's learned residual."""
        table = self.vit.embeddings.position_embedding.weight
        low, grid = math.isqrt(table.shape[0]), self.highres_grids[scale_index]
        square = table.float().reshape(1, low, low, -1).permute(0, 3, 1, 2)
        square = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
        resized = square[0].permute(1, 2, 0).reshape(grid * grid, -1).to(table.dtype)
        return resized + self.pos_emb_residual[scale_index]

    def embed_selected(self, images: Tensor, selected: list[Tensor]) -> Tensor:
        """Patch + position embeddings ``[B, K, D]`` of the selected patches only, scale by scale.

        Only the selected patches are gathered (a strided view of the resized image indexed by patch row
        and column), never the whole unfolded grid, then the conv weights are applied as a matmul.
        """
        conv = self.vit.embeddings.patch_embedding
        weight = conv.weight.flatten(1).T  # [3*p*p, D], the (channel, row, col) order of a patch below
        patch = self.cfg.patch_size
        tokens = []
        for scale_index, index in enumerate(selected):
            if index.shape[1] == 0:
                continue
            grid = self.highres_grids[scale_index]
            pixels = _resize(images, self.cfg.scales[scale_index + 1])
            cells = pixels.reshape(pixels.shape[0], 3, grid, patch, grid, patch)  # [B, 3, row, i, col, j]
            batch = torch.arange(index.shape[0], device=index.device)[:, None]
            picked = cells[batch, :, index // grid, :, index % grid, :]  # [B, K, 3, p, p]
            embedded = picked.flatten(2).to(weight.dtype) @ weight + conv.bias
            tokens.append(embedded + self.scale_pos_embed(scale_index)[index])
        return torch.cat(tokens, dim=1)

    def forward_high_res(
        self, tokens: Tensor, kv_cache: list[tuple[Tensor, Tensor]], feature_layer: int | None = None
    ) -> Tensor:
        """High-res tokens through the ViT; in layer l they also attend to the low-res K/V of layer l.

        Returns the final tokens after the last LayerNorm, or with ``feature_layer`` (a block index, may be
        negative) that block's output, the later blocks skipped.
        """
        layers = list(self.vit.encoder.layers)
        stop = len(layers) if feature_layer is None else range(len(layers))[feature_layer] + 1
        for layer, prefix in zip(layers[:stop], kv_cache[:stop], strict=True):
            tokens, _, _ = self._block(layer, tokens, prefix)
        return self.vit.post_layernorm(tokens) if feature_layer is None else tokens

    def look_close(
        self, images: Tensor, low: LowResPass, scores: list[Tensor], num_select: int, feature_layer: int | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Select and encode ``num_select`` high-res patches in rounds of at most ``max_select`` each.

        Each round takes the best patches not chosen before and sees only the low-res K/V, not the other
        rounds (the reference's ``num_look_close``); ``selection.round_plan`` gives each round's per-scale
        quotas, so a budget covering the whole image encodes every patch in the reference's round count.
        Returns the indices per scale and the tokens ``[B, K, D]`` (final, or of block ``feature_layer``).
        """
        flat = [s.flatten(1) for s in scores]
        taken = [torch.zeros_like(s, dtype=torch.bool) for s in flat]
        per_scale: list[list[tuple[Tensor, Tensor]]] = [[] for _ in flat]
        num_patches = sum(s.shape[1] for s in flat)
        for quotas in round_plan(num_select, self.cfg.round_quotas, num_patches):
            self._encode_round(images, low, flat, quotas, taken, per_scale, feature_layer)
        # "All" on grids the quotas do not tile (not the paper's 1.5K/4K ones): the last scale's roll-over
        # overflow is dropped, as in the reference; take the few patches left in extra rounds.
        while num_select >= num_patches and (left := [int((~t[0]).sum()) for t in taken]) and sum(left):
            quotas = take_leftovers(left, self.cfg.max_select)
            self._encode_round(images, low, flat, quotas, taken, per_scale, feature_layer)
        return _merge_rounds(per_scale, low.tokens)

    def _encode_round(
        self,
        images: Tensor,
        low: LowResPass,
        flat: list[Tensor],
        quotas: list[int],
        taken: list[Tensor],
        per_scale: list[list[tuple[Tensor, Tensor]]],
        feature_layer: int | None = None,
    ) -> None:
        """One selection round: pick by ``quotas`` among patches not ``taken``, encode, record (in place)."""
        index = select_top_k(flat, quotas, taken)
        counts = [i.shape[1] for i in index]
        if sum(counts) == 0:
            return
        encoded = self.forward_high_res(self.embed_selected(images, index), low.kv_cache, feature_layer)
        for scale, (idx, tok) in enumerate(zip(index, encoded.split(counts, dim=1), strict=True)):
            per_scale[scale].append((idx, tok))
            taken[scale].scatter_(1, idx, True)

    def pool(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """SigLIP attention-pool head, optionally over the ``mask``-ed tokens only (``[B, N]`` bool)."""
        head = self.vit.head
        probe = head.probe.expand(tokens.shape[0], -1, -1)
        padding = None if mask is None else ~mask
        pooled = head.attention(probe, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]
        return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]

    # ---- all together --------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        prompt_embeds: Tensor | None = None,
        gt_maps: Tensor | None = None,
        is_global: Tensor | None = None,
        num_select: int | None = None,
    ) -> PS3VisionOutput:
        """Encode square images given at the largest scale.

        Args:
            images: ``[B, 3, H, H]`` normalised pixels.
            prompt_embeds: ``[B, T]`` text embeddings for top-down selection (L2-normalised and projected
                by ``prompt_proj`` here); None selects bottom-up.
            gt_maps: ``[B, H, H]`` 1 inside the caption's box: forces those patches first, restricts the
                pooling to them and gives ``gt_targets``.
            is_global: ``[B]`` bool, True where the pooled embedding is the low-res one.
            num_select: high-res patches per image (default ``max_select``, one round).
        """
        _check_inputs(images, prompt_embeds, gt_maps, is_global)
        low = self.forward_low_res(images)
        bottomup, topdown = self.selection_probs(images, low.hidden_states, prompt_embeds)
        scores = topdown if topdown is not None else bottomup
        gt_targets = None
        if gt_maps is not None:
            scores = self.force_gt(scores, gt_maps)
            gt_targets = [(area_downsample(gt_maps, g) > 0).float() for g in self.highres_grids]
        budget = self.cfg.max_select if num_select is None else num_select
        selected, high_tokens = self.look_close(images, low, scores, budget)
        low_pooled = self.pool(low.tokens)
        pooled = low_pooled
        if high_tokens.shape[1]:
            pooled = self.pool(high_tokens, _inside_gt(gt_targets, selected))
            if is_global is not None:
                pooled = torch.where(is_global[:, None], low_pooled, pooled)
        return PS3VisionOutput(
            pooled=pooled,
            low_res_tokens=low.tokens,
            high_res_tokens=high_tokens,
            selected=selected,
            bottomup_probs=bottomup,
            topdown_probs=topdown,
            selection_probs=scores,
            gt_targets=gt_targets,
            low_res_pooled=low_pooled,
        )

    def _block(self, layer: nn.Module, x: Tensor, prefix: tuple[Tensor, Tensor] | None) -> tuple:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block_forward, layer, x, prefix, use_reentrant=False)
        return block_forward(layer, x, prefix)


def _resize(images: Tensor, size: int) -> Tensor:
    """Bicubic resize to ``size x size`` in fp32 (as the reference), back to the input dtype."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).to(images.dtype)


def _merge_rounds(per_scale: list[list[tuple[Tensor, Tensor]]], low_tokens: Tensor) -> tuple[list[Tensor], Tensor]:
    """Concatenate the rounds per scale, patches in raster order, then the scales low to high."""
    num_batch, _, dim = low_tokens.shape
    selected, tokens = [], []
    for rounds in per_scale:
        if not rounds:
            selected.append(torch.empty(num_batch, 0, dtype=torch.long, device=low_tokens.device))
            continue
        index = torch.cat([i for i, _ in rounds], dim=1)
        scale_tokens = torch.cat([t for _, t in rounds], dim=1)
        if len(rounds) > 1:
            order = index.argsort(dim=1)
            index = index.gather(1, order)
            scale_tokens = scale_tokens.gather(1, order[..., None].expand(-1, -1, dim))
        selected.append(index)
        tokens.append(scale_tokens)
    if not tokens:
        return selected, low_tokens.new_zeros(num_batch, 0, dim)
    return selected, torch.cat(tokens, dim=1)


def _inside_gt(gt_targets: list[Tensor] | None, selected: list[Tensor]) -> Tensor | None:
    """Which selected tokens lie in the GT box (``[B, K]``); a sample with none keeps all its tokens."""
    if gt_targets is None:
        return None
    inside = torch.cat([t.flatten(1).gather(1, i) for t, i in zip(gt_targets, selected, strict=True)], dim=1) > 0
    return inside | ~inside.any(dim=1, keepdim=True)


def _check_inputs(images: Tensor, prompt: Tensor | None, gt_maps: Tensor | None, is_global: Tensor | None) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be [B, 3, H, H] (square, at the largest scale), got {tuple(images.shape)}")
    num_batch, size = images.shape[0], images.shape[-1]
    if prompt is not None and (prompt.ndim != 2 or prompt.shape[0] != num_batch):
        raise ValueError(f"prompt_embeds must be [B, T] with B={num_batch}, got {tuple(prompt.shape)}")
    if gt_maps is not None and tuple(gt_maps.shape) != (num_batch, size, size):
        raise ValueError(f"gt_maps must be [B, H, W] = {(num_batch, size, size)}, got {tuple(gt_maps.shape)}")
    if is_global is not None and (is_global.dtype != torch.bool or tuple(is_global.shape) != (num_batch,)):
        raise ValueError(
            f"is_global must be a bool [{num_batch}] tensor, got {is_global.dtype} {tuple(is_global.shape)}"
        )

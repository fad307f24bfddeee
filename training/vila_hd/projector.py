"""Vision-to-LLM modules of VILA-HD (spec 5.1, 5.2): 2x2 downsampling projector, high-res positions, prompt head.

* ``DownsampleProjector`` is NVILA's ``mlp_downsample``: each 2x2 block of patch tokens becomes one
  token of 4x the channels (odd grids are zero-padded first, so 27x27 -> 14x14 = 196), then
  LayerNorm -> Linear -> GELU -> Linear to the LLM width.
* ``HighResPositions``: a learned, zero-initialised position map (area-resized to each scale's token
  grid) plus a per-scale embedding, both added after the projector (the reference's
  ``high_res_pos_embed`` / ``high_res_scale_embed``).
* ``TopDownPromptHead``: the LLM hidden state of the last user-prompt token -> the PS3 prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn

from ps3_engine.training.ps3.layers import Mlp


def space_to_channel(grid_bhwc: Tensor) -> Tensor:
    """``[B, h, w, C]`` -> ``[B, ceil(h/2) * ceil(w/2), 4C]``: each 2x2 block in one token, raster order.

    Odd sides are padded with zeros at the bottom/right (NVILA's ``DownSampleBlock``). Within a block the
    channels run (top-left, top-right, bottom-left, bottom-right).
    """
    num_batch, height, width, channels = grid_bhwc.shape
    grid_bhwc = F.pad(grid_bhwc, (0, 0, 0, width % 2, 0, height % 2))
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    blocks = grid_bhwc.view(num_batch, half_h, 2, half_w, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(num_batch, half_h * half_w, 4 * channels)


class DownsampleProjector(nn.Module):
    """2x2 spatial-to-channel then a 2-layer MLP (NVILA ``mlp_downsample``)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * vision_dim)
        self.fc1 = nn.Linear(4 * vision_dim, llm_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def project(self, blocks: Tensor) -> Tensor:
        """``[..., 4D]`` already-downsampled blocks -> ``[..., H]``."""
        return self.fc2(self.act(self.fc1(self.norm(blocks))))

    def forward(self, grid_bhwd: Tensor) -> Tensor:
        """``[B, h, w, D]`` patch-token map -> ``[B, ceil(h/2) * ceil(w/2), H]``."""
        return self.project(space_to_channel(grid_bhwd))


class HighResPositions(nn.Module):
    """Zero-init learned position map ``[H, P, P]`` and per-scale embeddings ``[S, H]`` for high-res tokens."""

    def __init__(self, llm_dim: int, grid: int, num_scales: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(llm_dim, grid, grid))
        self.scale_embed = nn.Parameter(torch.zeros(num_scales, llm_dim))

    def forward(self, scale_index: int, grid: int) -> Tensor:
        """Position + scale embedding of every token of a ``grid x grid`` token map, ``[grid*grid, H]``."""
        table = self.pos_embed
        if table.shape[-1] != grid:
            table = F.interpolate(table[None].float(), size=(grid, grid), mode="area")[0].to(table.dtype)
        return table.flatten(1).T + self.scale_embed[scale_index]


class TopDownPromptHead(nn.Module):
    """LLM hidden ``[B, H]`` -> PS3 prompt ``[B, D]``: ``mlp`` (H -> 2D -> D, LayerNorm) or ``linear``."""

    def __init__(self, llm_dim: int, vision_dim: int, kind: str) -> None:
        super().__init__()
        if kind == "mlp":
            self.net: nn.Module = Mlp(llm_dim, 2 * vision_dim, vision_dim)
        elif kind == "linear":
            self.net = nn.Linear(llm_dim, vision_dim)
        else:
            raise ValueError(f"top_down_head must be 'mlp' or 'linear', got {kind!r}")

    def forward(self, hidden_bh: Tensor) -> Tensor:
        return self.net(hidden_bh)

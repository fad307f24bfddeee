"""Building blocks of PS3: the selection MLPs, the shallow ConvNeXt branch and a ViT block with a KV prefix.

The reference code takes these from timm (``Mlp``, ``LayerNorm2d``, ``ConvNeXtBlock``); they are small
enough to write here, which keeps timm out of the dependencies. The ViT block runs the weights of a
transformers ``SiglipEncoderLayer`` so that the same SigLIP weights serve the low-res and high-res passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn


class Mlp(nn.Module):
    """timm ``Mlp(norm_layer=nn.LayerNorm)``: fc1 -> GELU -> LayerNorm(hidden) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm ``LayerNorm2d``, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block as in timm: depthwise 7x7, LayerNorm, MLP x4, layer scale (init 1e-6), residual.

    The layer-scale vector is called ``layer_scale`` rather than ``gamma``: transformers renames ``gamma``
    parameters when saving (the reference code works around the same problem).
    """

    def __init__(self, channels: int, kernel_size: int = 7, mlp_ratio: int = 4, ls_init: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc1 = nn.Linear(channels, mlp_ratio * channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * channels, channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), ls_init))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))) * self.layer_scale
        return x + y.permute(0, 3, 1, 2)


class ShallowConvNet(nn.Module):
    """High-res selection features (spec 2.3): conv k=stride=2*patch, LayerNorm2d, ConvNeXt blocks, 1x1 conv.

    On a 1512 image with 28-px stems this gives a 54x54 map, i.e. the grid of the first high-res scale.
    """

    def __init__(self, hidden: int, num_blocks: int, stem_kernel: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, hidden, stem_kernel, stride=stem_kernel), LayerNorm2d(hidden))
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden) for _ in range(num_blocks)])
        self.out_proj = nn.Conv2d(hidden, hidden, kernel_size=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.out_proj(self.blocks(self.stem(images)))


def block_forward(layer: nn.Module, x: Tensor, prefix_kv: tuple[Tensor, Tensor] | None = None) -> tuple:
    """One SigLIP encoder layer (pre-norm attention + MLP) whose attention may see extra keys/values.

    ``prefix_kv`` holds keys and values ``[B, heads, M, head_dim]`` (the low-res tokens of the same layer)
    that are put before this sequence's own keys and values; queries come from ``x`` only, so the
    prefix tokens are read, never updated. Returns the new hidden states and this sequence's own keys
    and values (what the low-res pass caches for the high-res pass).
    """
    attn = layer.self_attn
    num_batch, num_tokens, dim = x.shape
    h = layer.layer_norm1(x)

    def heads(t: Tensor) -> Tensor:
        return t.view(num_batch, num_tokens, attn.num_heads, attn.head_dim).transpose(1, 2)

    q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
    keys, values = k, v
    if prefix_kv is not None:
        keys = torch.cat([prefix_kv[0].to(k.dtype), k], dim=2)
        values = torch.cat([prefix_kv[1].to(v.dtype), v], dim=2)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout, scale=attn.scale)
    x = x + attn.out_proj(out.transpose(1, 2).reshape(num_batch, num_tokens, dim))
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, k, v

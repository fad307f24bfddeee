"""PS3 for contrastive pre-training: the PS3 vision encoder, the SigLIP text tower and the SigLIP logit scale/bias.

``PS3CLIP.from_config`` builds random towers from the config dicts (tests, debug) or loads a SigLIP
checkpoint folder (local path or ``s3://`` prefix) with ``SiglipModel.from_pretrained`` and adopts its
towers; the PS3 additions start fresh either way.

The top-down prompt is the caption's own text embedding, **not detached**, as in the reference
``CustomTextCLIP.forward``: the posterior box-supervision loss therefore also trains the text tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn

from ps3_engine.training.ps3.config import PS3ModelConfig, check_towers
from ps3_engine.training.ps3.vision import PS3VisionModel, PS3VisionOutput

__all__ = ["PS3CLIP", "PS3VisionModel", "PS3VisionOutput", "encode_image"]

DEFAULT_WEIGHTS_CACHE = "~/.cache/ps3-engine/weights"


class PS3CLIP(nn.Module):
    """PS3 vision encoder + SigLIP text tower (last-token pooled) + learned ``logit_scale`` / ``logit_bias``."""

    def __init__(self, cfg: PS3ModelConfig, vit: nn.Module, text: nn.Module) -> None:
        super().__init__()
        check_towers(cfg, vit.config, text.config)
        self.cfg = cfg
        self.vision = PS3VisionModel(cfg, vit, text_dim=text.config.projection_size)
        self.text = text
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.logit_scale_init))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.logit_bias_init))

    @classmethod
    def from_config(cls, cfg: PS3ModelConfig, s3: Any = None, cache_dir: str = DEFAULT_WEIGHTS_CACHE) -> PS3CLIP:
        """Random towers from ``cfg.vision`` / ``cfg.text``, or the towers of the ``cfg.pretrained`` SigLIP.

        Args:
            cfg: the model config.
            s3: ``infra.storage.S3Settings`` for an ``s3://`` checkpoint (default: from the environment).
            cache_dir: where an ``s3://`` checkpoint is copied once.
        """
        from transformers import SiglipModel, SiglipTextConfig, SiglipTextModel, SiglipVisionConfig, SiglipVisionModel

        if cfg.pretrained is None:
            vit = SiglipVisionModel(SiglipVisionConfig(**(cfg.vision or {})))
            text = SiglipTextModel(SiglipTextConfig(**(cfg.text or {})))
            return cls(cfg, vit, text)
        folder = resolve_checkpoint_dir(cfg.pretrained, cache_dir, s3)
        siglip = SiglipModel.from_pretrained(folder, dtype=torch.float32)
        model = cls(cfg, siglip.vision_model, siglip.text_model)
        with torch.no_grad():  # SigLIP's learned scale and bias replace the config's initial values
            model.logit_scale.copy_(siglip.logit_scale.reshape(1))
            model.logit_bias.copy_(siglip.logit_bias.reshape(1))
        return model

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (both ViT passes and the text tower)."""
        self.vision.gradient_checkpointing = enable
        if enable:
            self.text.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.text.activation_checkpointing_disable()

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """SigLIP text embedding ``[B, D]`` of ``input_ids`` ``[B, L]``, not normalised.

        No attention mask, on purpose: SigLIP's text tower was trained on ids padded to the context length
        with the pads visible and pools the last position (the reference's ``TextTransformer`` with
        ``no_causal_mask`` and ``pool_type="last"``). A padding mask would change the pretrained embedding
        from step 0, and that embedding is both the contrastive target and the top-down selection prompt.
        Callers must therefore pad to the full context length, as ``CorpusSampleTransform`` does.
        """
        return self.text(input_ids=input_ids).pooler_output

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        gt_maps: Tensor | None = None,
        is_global: Tensor | None = None,
    ) -> dict[str, Any]:
        """One pre-training forward: the caption both drives the selection and is the contrastive target.

        Returns a dict with ``image_embeds`` and ``text_embeds`` (L2-normalised, fp32), ``logit_scale``
        (exponentiated), ``logit_bias``, ``topdown_probs`` / ``bottomup_probs`` / ``gt_targets`` (lists per
        high-res scale) and ``is_global``.
        """
        text_embeds = F.normalize(self.encode_text(input_ids), dim=-1)
        vision = self.vision(images, prompt_embeds=text_embeds, gt_maps=gt_maps, is_global=is_global)
        # fp32 embeddings whatever the autocast dtype, so the loss may run outside autocast
        return {
            "image_embeds": F.normalize(vision.pooled.float(), dim=-1),
            "text_embeds": text_embeds.float(),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
            "topdown_probs": vision.topdown_probs,
            "bottomup_probs": vision.bottomup_probs,
            "gt_targets": vision.gt_targets,
            "is_global": is_global,
        }


@torch.no_grad()
def encode_image(
    model: PS3VisionModel | PS3CLIP,
    images: Tensor,
    num_select: int | None = None,
    prompt_embeds: Tensor | None = None,
) -> PS3VisionOutput:
    """Inference: encode with a budget of ``num_select`` high-res patches (default ``max_select``).

    Top-down with ``prompt_embeds`` (a text embedding, e.g. ``PS3CLIP.encode_text``), bottom-up without.
    Budgets above ``max_select`` run several selection rounds (each sees the low-res K/V only); 0 gives
    the low-res tokens alone. The model is used in whatever train/eval mode it is in.
    """
    vision = model.vision if isinstance(model, PS3CLIP) else model
    if num_select is not None and num_select < 0:
        raise ValueError(f"num_select must be >= 0, got {num_select}")
    return vision(images, prompt_embeds=prompt_embeds, num_select=num_select)


def resolve_checkpoint_dir(pretrained: str, cache_dir: str, s3: Any = None) -> str:
    """A local folder ``from_pretrained`` can open: the path itself, or an ``s3://`` prefix copied to a cache.

    Raises:
        ValueError: a local path without ``config.json``.
    """
    if pretrained.startswith("s3://"):
        # The S3 prefix sync lives with the captioner weights; it goes through the infra storage seam.
        from ps3_engine.stages.captioning.weights import resolve_model_dir

        return resolve_model_dir(pretrained, str(Path(cache_dir).expanduser()), s3)
    folder = Path(pretrained).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"pretrained SigLIP folder {pretrained!r} has no config.json")
    return str(folder)

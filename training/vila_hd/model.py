"""VILA-HD (spec 5.1, 5.2): the PS3 encoder, a 2x2-downsampling MLP projector and a Qwen2 causal LM.

One forward, ``look_close_mode="after_prompt"`` (top-down, the default):

1. PS3 low-res pass; the projector turns its 2D token map into LLM tokens (27x27 -> 196 at 1.5K).
2. Pass 1, **no grad**: the LLM reads [text before ``<image>``; low-res tokens; text] up to the last
   token of the user prompt (the token before the first ``<|im_end|>`` after the image). That token's
   last-layer hidden state goes through ``top_down_prompt_head`` (with grad) and becomes the PS3 prompt.
3. PS3 scores the patches with that prompt and encodes the top ``num_select`` high-res patches (rounds
   of ``max_select``, each attending to the low-res K/V).
4. Each scale's selected tokens are scattered into a zero-filled map, downsampled 2x2 and projected; a
   downsampled token is kept only when all 4 of its patches were selected. Learned zero-init high-res
   position and per-scale embeddings are added after the projector.
5. Pass 2: the LLM reads the text with ``<image>`` replaced by [low-res tokens; kept high-res tokens
   in scale order] (after the image, as the public code does; the paper's figure puts them after
   the text), and the loss is the next-token loss plus ``selection_loss_weight`` x (BCE + Dice) of the
   top-down probabilities against the evidence box.

``after_image`` selects bottom-up (PS3's learned prior prompt) and skips pass 1.

Simplifications against the reference: one image per sample; the projector sees PS3's last layer only
(VILA returns the last 2); the projector runs on the kept 2x2 blocks only rather than on the whole
zero-filled map, which gives the same tokens because it acts on each token separately; the PS3 text
side (``prompt_proj``) and attention-pool head are unused and frozen.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from ps3_engine.infra.storage import S3Settings, Storage
from ps3_engine.training.ps3.model import DEFAULT_WEIGHTS_CACHE, PS3CLIP, resolve_checkpoint_dir
from ps3_engine.training.ps3.selection import area_downsample, upsample_nearest
from ps3_engine.training.ps3.vision import LowResPass, PS3VisionModel
from ps3_engine.training.vila_hd.config import COMPONENTS, VilaHDConfig
from ps3_engine.training.vila_hd.losses import next_token_loss, selection_loss
from ps3_engine.training.vila_hd.projector import (
    DownsampleProjector,
    HighResPositions,
    TopDownPromptHead,
    space_to_channel,
)
from ps3_engine.training.vila_hd.sequence import (
    find_image_positions,
    find_prompt_ends,
    left_align,
    resolve_budget,
    splice_vision,
)
from ps3_engine.training.vila_hd.tokenizer import encode_conversation


@dataclass
class VisionTokens:
    """What the vision side hands the LLM, and how it chose (lists per high-res scale, low to high)."""

    low_res: Tensor  # [B, n_low, H]
    high_res: list[Tensor]  # per sample [n_b, H], scale by scale
    selected: list[Tensor]  # per scale [B, k_s] patch indices
    topdown_probs: list[Tensor] | None
    bottomup_probs: list[Tensor] | None
    prompt_hidden: Tensor | None  # [B, H] pass-1 hidden state (no grad)

    @property
    def num_high_res_kept(self) -> list[int]:
        return [int(t.shape[0]) for t in self.high_res]

    @property
    def num_vision_tokens(self) -> list[int]:
        return [self.low_res.shape[1] + n for n in self.num_high_res_kept]


@dataclass
class VilaHDOutput:
    loss: Tensor
    lm_loss: Tensor
    selection_loss: Tensor
    logits: Tensor
    vision: VisionTokens
    gt_targets: list[Tensor] | None


@dataclass
class VilaHDGeneration:
    texts: list[str]
    num_vision_tokens: list[int]
    num_selected_patches: int


class VilaHD(nn.Module):
    """PS3 + projector + Qwen2. Build with :meth:`from_config`; the token ids come from the tokenizer."""

    def __init__(
        self, cfg: VilaHDConfig, vision: PS3VisionModel, llm: nn.Module, *, image_token_id: int, eos_token_id: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.llm = llm
        width, llm_dim = vision.vit.config.hidden_size, llm.config.hidden_size
        self.projector = DownsampleProjector(width, llm_dim)
        # one scale embedding per scale, the low-res one first (VILA's high_res_scale_embed[0] is the low-res one)
        self.high_res_positions = HighResPositions(llm_dim, cfg.resolved_pos_embed_grid, cfg.ps3.num_highres_scales + 1)
        self.top_down_head = TopDownPromptHead(llm_dim, width, cfg.top_down_head)
        self.image_token_id, self.eos_token_id = image_token_id, eos_token_id
        self.set_trainable(COMPONENTS)

    @classmethod
    def from_config(
        cls,
        cfg: VilaHDConfig,
        tokenizer: Any,
        *,
        load_weights: bool = True,
        s3: S3Settings | None = None,
        cache_dir: str = DEFAULT_WEIGHTS_CACHE,
    ) -> VilaHD:
        """Random or pretrained parts; ``load_weights=False`` builds shapes only (a checkpoint follows)."""
        vision = _build_vision(cfg, load_weights, s3, cache_dir)
        llm = _build_llm(cfg, load_weights, s3, cache_dir)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (cfg.image_token, cfg.prompt_end_token)}
        if any(i is None or i == tokenizer.unk_token_id for i in ids.values()):
            raise ValueError(f"the tokenizer lacks {sorted(ids)} as tokens (see tokenizer.add_image_token)")
        return cls(cfg, vision, llm, image_token_id=ids[cfg.image_token], eos_token_id=ids[cfg.prompt_end_token])

    # ---- what trains ---------------------------------------------------------------------------
    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component. PS3's ``prompt_proj`` and pooling head are in none: VILA-HD never uses them."""
        selector = self.vision.selector
        selector_ids = {id(p) for p in selector.parameters()}
        return {
            "projector": [*self.projector.parameters(), *self.high_res_positions.parameters()],
            "top_down_head": list(self.top_down_head.parameters()),
            "selector": [p for n, p in selector.named_parameters() if not n.startswith("prompt_proj.")],
            "vision": [
                p
                for n, p in self.vision.named_parameters()
                if id(p) not in selector_ids and not n.startswith("vit.head.")
            ],
            "llm": list(self.llm.parameters()),
        }

    def component_of(self) -> dict[str, str]:
        """Parameter name -> component, for the parameters that belong to one."""
        owner = {id(p): name for name, params in self.components().items() for p in params}
        return {n: owner[id(p)] for n, p in self.named_parameters() if id(p) in owner}

    def set_trainable(self, names: tuple[str, ...] | list[str]) -> None:
        unknown = set(names) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; known: {list(COMPONENTS)}")
        self.requires_grad_(False)
        groups = self.components()
        for name in names:
            for param in groups[name]:
                param.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.gradient_checkpointing = enable
        if enable:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.llm.gradient_checkpointing_disable()

    # ---- vision side ---------------------------------------------------------------------------
    def encode(
        self,
        images: Tensor,
        input_ids: Tensor,
        text_embeds: Tensor,
        evidence_maps: Tensor | None,
        num_select: int,
        look_close_mode: str,
    ) -> VisionTokens:
        """Low-res tokens, the prompt (pass 1), selection and the kept high-res tokens."""
        low = self.vision.forward_low_res(images)
        grid = self.cfg.ps3.grid_sizes[0]
        # VILA's projector reads layer mm_vision_select_layer (-2: the second-to-last block's output, no
        # final norm), and the low-res tokens get the high-res position map and scale embedding 0 too.
        layer = low.hidden_states[self.cfg.vision_select_layer]
        low_res = self.projector(layer.view(images.shape[0], grid, grid, -1))
        low_res = low_res + self.high_res_positions(0, self.cfg.low_res_token_grid)
        prompt_hidden = prompt = None
        if look_close_mode == "after_prompt":
            prompt_hidden = self.prompt_hidden(input_ids, text_embeds, low_res)
            prompt = self.top_down_head(prompt_hidden)
        elif look_close_mode != "after_image":
            raise ValueError(f"look_close_mode must be 'after_prompt' or 'after_image', got {look_close_mode!r}")
        bottomup, topdown = self.selection_probs(images, low, prompt)
        scores = topdown if topdown is not None else bottomup
        assert scores is not None
        if evidence_maps is not None and self.cfg.train_with_gt_selection and self.training:
            scores = self.vision.force_gt(scores, evidence_maps)
        selected, high_tokens = self.vision.look_close(
            images, low, scores, num_select, feature_layer=self.cfg.vision_select_layer
        )
        high_res = self.project_high_res(high_tokens, selected, low_res)
        return VisionTokens(low_res, high_res, selected, topdown, bottomup, prompt_hidden)

    @torch.no_grad()
    def prompt_hidden(self, input_ids: Tensor, text_embeds: Tensor, low_res: Tensor) -> Tensor:
        """Pass 1: last-layer hidden state ``[B, H]`` of the last user-prompt token, without gradients."""
        image_pos = find_image_positions(input_ids, self.image_token_id)
        prompt_end = find_prompt_ends(input_ids, image_pos, self.eos_token_id)
        embeds, mask, _ = splice_vision(text_embeds, image_pos, prompt_end + 1, list(low_res))
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]

    def selection_probs(
        self, images: Tensor, low: LowResPass, prompt: Tensor | None
    ) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """(bottom-up, top-down) probabilities per high-res scale; only the one in use is computed.

        The prompt is used as given (the reference's LLM prompt bypasses PS3's text-side ``prompt_proj``).
        """
        selector, ps3 = self.vision.selector, self.cfg.ps3
        feats, conv_map = selector.features(
            [low.hidden_states[i] for i in ps3.select_layers], resize_square(images, ps3.conv_input_size)
        )
        use = selector.prior(images.shape[0]) if prompt is None else prompt
        probs = selector.probabilities(feats, conv_map, use)
        per_scale = [upsample_nearest(probs, g) for g in self.vision.highres_grids]
        return (per_scale, None) if prompt is None else (None, per_scale)

    def project_high_res(self, tokens: Tensor, selected: list[Tensor], low_res: Tensor) -> list[Tensor]:
        """Per sample ``[n_b, H]``: each scale's complete 2x2 blocks of selected patches, projected, plus positions."""
        num_batch, _, width = tokens.shape
        per_sample: list[list[Tensor]] = [[] for _ in range(num_batch)]
        offset = 0
        for scale, (index, grid) in enumerate(zip(selected, self.vision.highres_grids, strict=True)):
            count = index.shape[1]
            if count == 0:
                continue
            scale_tokens, offset = tokens[:, offset : offset + count], offset + count
            full = scale_tokens.new_zeros(num_batch, grid * grid, width)
            full = full.scatter(1, index[..., None].expand(-1, -1, width), scale_tokens)
            chosen = scale_tokens.new_zeros(num_batch, grid * grid, 1).scatter(1, index[..., None], 1.0)
            keep = space_to_channel(chosen.view(num_batch, grid, grid, 1)).amin(-1) > 0  # [B, n]
            blocks = space_to_channel(full.view(num_batch, grid, grid, width))
            positions = self.high_res_positions(scale + 1, (grid + 1) // 2)
            projected = self.projector.project(blocks[keep]) + positions.expand(num_batch, -1, -1)[keep]
            for sample, part in enumerate(projected.split(keep.sum(1).tolist())):
                per_sample[sample].append(part)
        empty = low_res.new_zeros(0, low_res.shape[-1])
        return [torch.cat(parts) if parts else empty for parts in per_sample]

    # ---- both passes ---------------------------------------------------------------------------
    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        evidence_maps: Tensor | None = None,
        num_select: int | None = None,
        look_close_mode: str | None = None,
    ) -> VilaHDOutput:
        """Training forward.

        Args:
            images: ``[B, 3, S, S]`` normalised, at the largest scale.
            input_ids: ``[B, T]`` right-padded chat tokens with one ``<image>`` each.
            attention_mask: ``[B, T]``.
            labels: ``[B, T]`` with ``IGNORE_INDEX`` off the supervised tokens (None: no LM loss).
            evidence_maps: ``[B, S, S]`` 1 inside the evidence boxes; an all-zero map means "no evidence".
            num_select: high-res patch budget (default ``cfg.num_select``).
            look_close_mode: default ``cfg.look_close_mode``.
        """
        text_embeds = self.llm.get_input_embeddings()(input_ids)
        vision = self.encode(
            images,
            input_ids,
            text_embeds,
            evidence_maps,
            self.cfg.num_select if num_select is None else num_select,
            look_close_mode or self.cfg.look_close_mode,
        )
        embeds, mask, spliced_labels = self.splice(input_ids, attention_mask, text_embeds, vision, labels)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask).logits
        lm_loss = next_token_loss(logits, spliced_labels) if spliced_labels is not None else logits.sum() * 0.0
        probs = vision.topdown_probs if vision.topdown_probs is not None else vision.bottomup_probs
        assert probs is not None
        gt_targets, sel_loss = None, torch.zeros((), device=logits.device)
        if evidence_maps is not None:
            gt_targets = [(area_downsample(evidence_maps, g) > 0).float() for g in self.vision.highres_grids]
            sel_loss = selection_loss(probs, gt_targets, evidence_maps.flatten(1).any(dim=1))
        loss = lm_loss + self.cfg.selection_loss_weight * sel_loss
        return VilaHDOutput(loss, lm_loss, sel_loss, logits, vision, gt_targets)

    def splice(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        text_embeds: Tensor,
        vision: VisionTokens,
        labels: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pass-2 inputs: ``<image>`` replaced by the low-res then the kept high-res tokens."""
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("input_ids must be right-padded (the attention mask is ones then zeros)")
        image_pos = find_image_positions(input_ids, self.image_token_id)
        pairs = zip(vision.low_res, vision.high_res, strict=True)
        parts = [torch.cat([low, high.to(low.dtype)]) for low, high in pairs]
        return splice_vision(text_embeds, image_pos, attention_mask.sum(1), parts, labels)

    # ---- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        question: str | list[str],
        tokenizer: Any,
        max_new_tokens: int = 32,
        num_select: int | None = None,
        num_look_close: int | None = None,
        look_close_mode: str | None = None,
    ) -> VilaHDGeneration:
        """Greedy answers to one question per image, with a budget of patches (or of selection rounds)."""
        questions = [question] * images.shape[0] if isinstance(question, str) else list(question)
        if len(questions) != images.shape[0]:
            raise ValueError(f"{len(questions)} questions for {images.shape[0]} images")
        budget = resolve_budget(num_select, num_look_close, self.cfg.ps3.max_select, self.cfg.num_select)
        encoded = [
            torch.tensor(encode_conversation(tokenizer, [("user", q)], add_generation_prompt=True)[0])
            for q in questions
        ]
        input_ids = pad_sequence(encoded, batch_first=True, padding_value=tokenizer.pad_token_id).to(images.device)
        attention_mask = pad_sequence([torch.ones_like(e) for e in encoded], batch_first=True).to(images.device)
        text_embeds = self.llm.get_input_embeddings()(input_ids)
        vision = self.encode(images, input_ids, text_embeds, None, budget, look_close_mode or self.cfg.look_close_mode)
        embeds, mask, _ = self.splice(input_ids, attention_mask, text_embeds, vision, None)
        embeds, mask = left_align(embeds, mask)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        return VilaHDGeneration(texts, vision.num_vision_tokens, sum(int(s.shape[1]) for s in vision.selected))


def resize_square(images: Tensor, size: int) -> Tensor:
    """Bicubic resize to ``size x size`` in fp32 (as PS3 does), back to the input dtype."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).to(images.dtype)


def _build_vision(cfg: VilaHDConfig, load_weights: bool, s3: S3Settings | None, cache_dir: str) -> PS3VisionModel:
    if load_weights or cfg.ps3.pretrained is None:
        vision = PS3CLIP.from_config(cfg.ps3, s3, cache_dir).vision  # the text tower is dropped
    else:
        from transformers import SiglipConfig, SiglipVisionModel

        siglip = SiglipConfig.from_pretrained(resolve_checkpoint_dir(cfg.ps3.pretrained, cache_dir, s3))
        vit = SiglipVisionModel(siglip.vision_config)
        vision = PS3VisionModel(cfg.ps3, vit, text_dim=siglip.text_config.projection_size)
    if load_weights and cfg.ps3_weights:
        load_ps3_weights(vision, cfg.ps3_weights, s3)
    return vision


def _build_llm(cfg: VilaHDConfig, load_weights: bool, s3: S3Settings | None, cache_dir: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if cfg.llm is not None:
        return Qwen2ForCausalLM(Qwen2Config(**cfg.llm))
    folder = resolve_checkpoint_dir(cfg.llm_pretrained or "", cache_dir, s3)
    if load_weights:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def load_ps3_weights(vision: PS3VisionModel, checkpoint_uri: str, s3: S3Settings | None = None) -> None:
    """Load the ``vision.*`` weights of a ``ps3-engine train ps3`` checkpoint folder (local or ``s3://``)."""
    state = torch.load(io.BytesIO(Storage(checkpoint_uri, s3).read_bytes("state.pt")), map_location="cpu")
    weights = {k.removeprefix("vision."): v for k, v in state["model"].items() if k.startswith("vision.")}
    if not weights:
        raise ValueError(f"{checkpoint_uri}/state.pt holds no PS3 vision weights")
    vision.load_state_dict(weights)
